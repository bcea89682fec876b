"""Listening sockets and the embedded ASGI servers (the OTLP/HTTP receiver and the API).

``serve_asgi`` binds ``address`` itself (so port 0 works and the real port is known before the
first request) and runs uvicorn on that socket inside the caller's loop; signals are left to the
caller, since several servers share one loop with gRPC.

Every connection is bounded (``ConnectionLimits``), so that slow or idle clients cannot hold the
server's file descriptors: a request head must arrive complete within ``header_timeout_s`` of its
first byte (or of the connection), a body may pause at most ``body_timeout_s`` between reads,
and a listener with ``max_connections`` open answers a new one ``503`` with ``Retry-After`` and
closes it at once. A timed-out request is answered ``408`` (if no answer was started) and closed.
Idle keep-alive connections are closed after uvicorn's ``timeout_keep_alive`` (5 s).

Why a protocol subclass: uvicorn has ``timeout_keep_alive`` and ``limit_concurrency``, but no
timeout while a request is being received (its keep-alive timer is cancelled by the first byte),
and ``limit_concurrency`` answers 503 only after a complete request head, so a client that never
finishes its head is never refused. Hypercorn's ``read_timeout`` restarts with every byte and it
has no connection limit either. The wrapper adds both to uvicorn's own h11 protocol, touching
only ``connection_made``, ``data_received`` and ``connection_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, cast

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

LIMITS_ENV = "OUTCOMEWATCH_LISTENER_LIMITS"


@dataclass(frozen=True)
class ConnectionLimits:
    """Per listener: how long a request may take to arrive, and how many connections are open."""

    header_timeout_s: float = 10.0  # from a request's first byte to its complete head
    body_timeout_s: float = 30.0  # longest pause between two reads of a request body
    max_connections: int = 1000  # open at once; one more is answered 503 and closed

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ConnectionLimits:
        """The defaults, overridden by the hidden setting ``OUTCOMEWATCH_LISTENER_LIMITS``
        (``header_timeout_s=0.5,max_connections=20``; for tests of a real process). A bad
        value raises ValueError rather than being replaced by a default."""
        text = environ.get(LIMITS_ENV, "").strip()
        given: dict[str, float] = {}
        names = [f.name for f in fields(cls)]
        for item in filter(None, text.split(",")):
            name, _, value = (part.strip() for part in item.partition("="))
            if name not in names:
                raise ValueError(f"{LIMITS_ENV}: unknown limit {name!r}; known: {names}")
            given[name] = float(value)
            if not given[name] > 0:
                raise ValueError(f"{LIMITS_ENV}: {name} must be > 0, got {value!r}")
        default = cls()
        return cls(
            header_timeout_s=given.get("header_timeout_s", default.header_timeout_s),
            body_timeout_s=given.get("body_timeout_s", default.body_timeout_s),
            max_connections=int(given.get("max_connections", default.max_connections)),
        )


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


def _plain_response(status: bytes, body: bytes, *headers: bytes) -> bytes:
    head = [b"HTTP/1.1 " + status, b"Content-Type: text/plain; charset=utf-8",
            b"Connection: close", b"Content-Length: %d" % len(body), *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_REFUSED = _plain_response(b"503 Service Unavailable",
                           b"too many open connections to this listener; retry later\n",
                           b"Retry-After: 1")
_TIMED_OUT = _plain_response(b"408 Request Timeout", b"the request did not arrive in time\n")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a body timeout and a connection limit."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _refused = False
    _timer: asyncio.TimerHandle | None = None
    _timing = ""  # "head" or "body": what the running timer waits for

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            # Refused before uvicorn sets anything up: the connection costs one write.
            self._refused = True
            transport.write(_REFUSED)
            transport.close()
            log.warning("refused a connection: %d open, the limit of this listener",
                        len(self.connections))
            return
        super().connection_made(transport)
        self._time("head", self.limits.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._time("body", self.limits.body_timeout_s)  # restarted by every read
        elif state is h11.IDLE:
            if self._timing != "head":  # the head's deadline runs from its first byte
                self._time("head", self.limits.header_timeout_s)
        else:
            self._stop_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._stop_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:
            self._stop_timer()  # idle between requests: uvicorn's keep-alive timeout applies

    def _time(self, what: str, seconds: float) -> None:
        self._stop_timer()
        self._timing = what
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timing = None, ""

    def _timed_out(self) -> None:
        self._timer = None
        if self._timing == "body" and self.flow.read_paused:
            # We stopped reading (the app is behind), not the client: wait again.
            self._time("body", self.limits.body_timeout_s)
            return
        if self.transport.is_closing():
            return
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and (
            self.cycle is None or not self.cycle.response_started
        ):
            self.transport.write(_TIMED_OUT)
        log.warning("closed a connection: its request %s did not arrive within %gs",
                    "head" if self._timing == "head" else "body",
                    self.limits.header_timeout_s if self._timing == "head"
                    else self.limits.body_timeout_s)
        self._timing = ""
        self.transport.close()
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
        # Inherited by accepted connections: a response written in two parts (head, body) must
        # not wait for the client's delayed ACK (40 ms per request on a kept-alive connection).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
    app: ASGIApp, address: Address, *, tls_cert: str | None = None, tls_key: str | None = None,
    limits: ConnectionLimits | None = None,
) -> Serving:
    """Serve ``app`` on ``address`` with ``limits`` (default: ``ConnectionLimits.from_env()``)
    on every connection; returns once it accepts connections."""
    sock = bind(address)
    protocol = type("GuardedH11", (GuardedH11Protocol,),
                    {"limits": limits or ConnectionLimits.from_env()})
    # Starlette's and uvicorn's ASGI type aliases spell the same protocol differently.
    config = uvicorn.Config(
        cast(Any, app), log_level="warning", access_log=False, lifespan="off",
        ssl_certfile=tls_cert, ssl_keyfile=tls_key, http=protocol,
    )
    server = EmbeddedUvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():  # it failed to start: say why
            task.result()
        await asyncio.sleep(0.01)
    return Serving(server, task, int(sock.getsockname()[1]))
