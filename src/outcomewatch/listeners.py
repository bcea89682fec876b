"""Listening sockets and the embedded ASGI servers (the OTLP/HTTP receiver and the API).

``serve_asgi`` binds ``address`` itself (so port 0 works and the real port is known before the
first request) and runs uvicorn on that socket inside the caller's loop; signals are left to the
caller, since several servers share one loop with gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import uvicorn
from starlette.types import ASGIApp


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class EmbeddedUvicorn(uvicorn.Server):
    """A uvicorn server that leaves signals to us: two of them share the loop with gRPC."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class BindError(OSError):
    """``address`` cannot be listened on; ``reason`` says why (``Address already in use``)."""

    def __init__(self, address: Address, reason: str, errno: int | None = None) -> None:
        super().__init__(errno, f"cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot listen on {self.address}: {self.reason}"


def bind(address: Address) -> socket.socket:
    """A socket bound to ``address``; raises BindError naming the address when it cannot be."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        raise BindError(address, exc.strerror or str(exc), exc.errno) from exc
    sock.set_inheritable(True)
    return sock


@dataclass
class Serving:
    """A running ASGI server: ``stop()`` asks it to finish the requests it is serving."""

    server: EmbeddedUvicorn
    task: asyncio.Task[None]
    port: int

    def stop(self) -> None:
        self.server.should_exit = True


async def serve_asgi(
    app: ASGIApp, address: Address, *, tls_cert: str | None = None, tls_key: str | None = None
) -> Serving:
    sock = bind(address)
    # Starlette's and uvicorn's ASGI type aliases spell the same protocol differently.
    config = uvicorn.Config(
        cast(Any, app), log_level="warning", access_log=False, lifespan="off",
        ssl_certfile=tls_cert, ssl_keyfile=tls_key,
    )
    server = EmbeddedUvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():  # it failed to start: say why
            task.result()
        await asyncio.sleep(0.01)
    return Serving(server, task, int(sock.getsockname()[1]))
