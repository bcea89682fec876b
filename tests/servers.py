"""Real servers on free loopback ports, run in background threads, for tests that use real
clients. Never a fixed port (4317/4318 may be taken by a real collector), never a sleep.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import uvicorn

T = TypeVar("T")

STARTUP_TIMEOUT_S = 10.0


class _Server(uvicorn.Server):
    """uvicorn.Server that says when it is listening, so that tests wait on an Event."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()  # listening, or failed: self.started says which


def serve_asgi_in_thread(app: Any) -> tuple[str, Callable[[], None]]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port; return (base_url, stop).

    The socket is bound here (port 0, so the OS picks a free port) and handed to uvicorn, so
    there is no window in which another process can take the port.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="auto")
    server = _Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn:{port}", daemon=True
    )
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=STARTUP_TIMEOUT_S)
        sock.close()

    if not server.ready.wait(STARTUP_TIMEOUT_S) or not server.started:
        stop()
        raise RuntimeError("uvicorn did not start (see the log for the app's startup error)")
    return f"http://127.0.0.1:{port}", stop


@contextmanager
def running_asgi(app: Any) -> Iterator[str]:
    """``with running_asgi(app) as base_url:`` the app is served for the block's duration."""
    base_url, stop = serve_asgi_in_thread(app)
    try:
        yield base_url
    finally:
        stop()


@contextmanager
def running_event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An asyncio loop running in a background thread (for grpc.aio servers and async sinks);
    submit work with ``run_in(loop, coroutine)``."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=STARTUP_TIMEOUT_S)
        loop.close()


def run_in(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on ``loop`` (in its thread) and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=STARTUP_TIMEOUT_S)
