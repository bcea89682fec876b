"""A real outcomewatch server for end-to-end tests: real gRPC, HTTP and API sockets on free
loopback ports, a real DuckDB file, and a clock the test moves (no sleeping through idle time)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Tracer

from outcomewatch.clock import ManualClock
from outcomewatch.listeners import Address
from outcomewatch.server import Server, Settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_RULES = ROOT / "rules" / "examples"
TRACE_IDLE = timedelta(seconds=10)


@dataclass
class RunningServer:
    server: Server
    clock: ManualClock
    loop: asyncio.AbstractEventLoop
    api: httpx.Client
    providers: list[TracerProvider] = field(default_factory=list)

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}/v1/traces"

    def tracer(self, transport: str, **resource: Any) -> Tracer:
        """A tracer whose spans the official OTLP exporter sends here as each span ends."""
        exporter = (
            GrpcSpanExporter(endpoint=self.grpc_endpoint, insecure=True)
            if transport == "grpc"
            else HttpSpanExporter(endpoint=self.http_endpoint)
        )
        provider = TracerProvider(resource=Resource.create(resource))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.providers.append(provider)
        return provider.get_tracer("outcomewatch-tests")

    def go_idle(self) -> None:
        """Move the clock past the trace idle time; the server's tick loop does the rest."""
        self.clock.advance(TRACE_IDLE + timedelta(seconds=1))

    def advance(self, delta: timedelta) -> None:
        self.clock.advance(delta)

    def get(self, path: str, **params: Any) -> Any:
        response = self.api.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def wait_for(self, probe: Callable[[], Any], *, what: str, timeout_s: float = 15.0) -> Any:
        """Poll ``probe`` until it returns something truthy. The timeout only bounds a broken
        run; no assertion depends on how long this takes."""
        give_up = time.monotonic() + timeout_s
        while True:
            result = probe()
            if result:
                return result
            if time.monotonic() > give_up:
                raise AssertionError(f"gave up waiting for {what}")
            time.sleep(0.02)

    def runs(self, **params: Any) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self.get("/api/v1/runs", **params)["runs"]
        return runs

    def verdict(self, trace_id: str, rule: str) -> dict[str, Any]:
        """The closed run of ``rule`` in ``trace_id`` (waits for it to be stored)."""
        def closed() -> dict[str, Any] | None:
            for run in self.runs(trace_id=trace_id, rule=rule):
                if run["status"] != "open":
                    return run
            return None
        result: dict[str, Any] = self.wait_for(closed, what=f"a verdict of {rule} on {trace_id}")
        return result


def last_noon() -> datetime:
    """The latest 12:00 UTC not after now. Far from the example schedule's slot (03:00
    Helsinki), so tests that move the clock by hours never cross it by accident whenever CI
    runs; and never ahead of the real clock the SDK stamps spans with, so a deadline counted
    from a span's start is never already past."""
    now = datetime.now(UTC)
    noon = now.replace(hour=12, minute=0, second=0, microsecond=0)
    return noon if noon <= now else noon - timedelta(days=1)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


@contextmanager
def running_server(
    tmp_path: Path, *, rules: list[Path] | None = None, trace_idle: timedelta = TRACE_IDLE,
    config: Path | None = None, api_token: str | None = None, clock: ManualClock | None = None,
    max_live_traces: int | None = None, decode_workers: int = 0,
) -> Iterator[RunningServer]:
    settings = Settings(
        max_live_traces=max_live_traces,
        decode_workers=decode_workers,
        rules=tuple(str(p) for p in (rules or [EXAMPLE_RULES])),
        db=str(tmp_path / "outcomewatch.duckdb"),
        grpc=Address("127.0.0.1", 0),
        http=Address("127.0.0.1", 0),
        api=Address("127.0.0.1", 0),
        trace_idle=trace_idle,
        tick=timedelta(milliseconds=20),
        notify_interval=timedelta(milliseconds=20),
        rules_poll=timedelta(milliseconds=50),
        config=str(config) if config else None,
        api_token=api_token,
    )
    clock = clock or ManualClock(last_noon())
    server = Server(settings, clock=clock)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
    headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
    api = httpx.Client(base_url=f"http://127.0.0.1:{server.api_port}", timeout=10,
                       headers=headers)
    running = RunningServer(server, clock, loop, api)
    try:
        yield running
    finally:
        for provider in running.providers:
            provider.shutdown()
        api.close()
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def trace_id_of(span: Any) -> str:
    return f"{span.get_span_context().trace_id:032x}"
