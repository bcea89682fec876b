"""The composition root: one asyncio loop running the OTLP receivers, the engine's clock tick and
the query API, around one Store.

Flow of an export: receiver decodes -> ``_ingest`` commits the spans (group commit) -> the export
is acknowledged -> the engine observes the spans -> opened/passed runs are queued to the writer.
Each tick, the engine hands back the runs that failed; their evidence is read from the stored
trace off the loop and the verdict and incident are written in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import uvicorn
from google.protobuf.internal import api_implementation
from starlette.types import ASGIApp

from outcomewatch.analyzer.engine import Engine
from outcomewatch.analyzer.evidence import failure_detail, failure_summary
from outcomewatch.api.app import create_app
from outcomewatch.clock import Clock, system_clock, to_ns
from outcomewatch.model import RunEvent, RunFailed, RunOpened, RunPassed
from outcomewatch.otlp import SpanBatch, decode_stored_span
from outcomewatch.receiver.grpc import start_grpc_receiver
from outcomewatch.receiver.http import create_http_receiver
from outcomewatch.receiver.limits import Limits
from outcomewatch.rules import RuleSet, load_rules
from outcomewatch.store.duckdb import IncidentFacts, Store
from outcomewatch.store.queries import Reader

log = logging.getLogger(__name__)

_LOOKBACK_NS = 10 * 60 * 1_000_000_000


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """Everything ``outcomewatch serve`` can be told; the CLI builds it once."""

    rules: tuple[str, ...] = ("rules",)
    db: str = "data/outcomewatch.duckdb"
    grpc: Address = Address("127.0.0.1", 4317)
    http: Address = Address("127.0.0.1", 4318)
    api: Address = Address("127.0.0.1", 8080)
    trace_idle: timedelta = timedelta(seconds=10)
    tick: timedelta = timedelta(milliseconds=100)
    limits: Limits = field(default_factory=Limits)


class _EmbeddedUvicorn(uvicorn.Server):
    """A uvicorn server that leaves signals to us: two of them share the loop with gRPC."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address.host, address.port))
    sock.set_inheritable(True)
    return sock


class Server:
    def __init__(self, settings: Settings, *, clock: Clock = system_clock) -> None:
        self.settings = settings
        self.clock = clock
        self.rules: RuleSet = load_rules(list(settings.rules))
        self.engine = Engine(self.rules, idle=settings.trace_idle, clock=clock)
        self.store: Store | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.api_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._uvicorns: list[_EmbeddedUvicorn] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._ready = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if api_implementation.Type() != "upb":
            log.warning("protobuf uses the %s backend; ingest will be ~100x slower than with upb",
                        api_implementation.Type())
        Path(self.settings.db).parent.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.settings.db)
        await self._recover()
        self._grpc, self.grpc_port = await start_grpc_receiver(
            self._ingest, host=self.settings.grpc.host, port=self.settings.grpc.port,
            limits=self.settings.limits,
        )
        http_app = create_http_receiver(self._ingest, limits=self.settings.limits)
        api_app = create_app(Reader(self.store.conn), ready=lambda: self._ready)
        self.http_port = await self._serve_asgi(http_app, self.settings.http)
        self.api_port = await self._serve_asgi(api_app, self.settings.api)
        self._background.append(asyncio.create_task(self._tick_loop()))
        self._ready = True
        log.info(
            "outcomewatch serving: OTLP/gRPC %s:%d, OTLP/HTTP %s:%d, API http://%s:%d; %d rules",
            self.settings.grpc.host, self.grpc_port, self.settings.http.host, self.http_port,
            self.settings.api.host, self.api_port, len(self.rules.rules),
        )

    async def _recover(self) -> None:
        """Rebuild live traces and open runs from the database, so that a restart (even after
        kill -9) neither forgets a run nor gives a verdict twice: verdicts already stored are
        skipped, and storing is idempotent (run ids are derived from the trigger span)."""
        assert self.store is not None
        since = to_ns(self.clock()) - int(self.settings.trace_idle.total_seconds() * 1e9)
        rows = await asyncio.to_thread(self.store.recovery_spans, since)
        if not rows:
            return
        spans = [(decode_stored_span(raw, res, scope=scope), received)
                 for raw, res, scope, received in rows]
        decided = await asyncio.to_thread(
            self.store.decided_run_ids, sorted({span.trace_id for span, _ in spans}))
        self.engine.forget_closed(decided)
        events = self.engine.replay(spans)
        self._record_runs(events)
        log.info("recovered %d spans: %d live traces, %d open runs",
                 len(spans), self.engine.live_traces, self.engine.open_runs)

    async def _serve_asgi(self, app: ASGIApp, address: Address) -> int:
        sock = _bind(address)
        # Starlette's and uvicorn's ASGI type aliases spell the same protocol differently.
        config = uvicorn.Config(
            cast(Any, app), log_level="warning", access_log=False, lifespan="off"
        )
        server = _EmbeddedUvicorn(config)
        self._uvicorns.append(server)
        self._background.append(asyncio.create_task(server.serve(sockets=[sock])))
        while not server.started:
            await asyncio.sleep(0.01)
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, let in-flight exports finish, store pending verdicts, close the file."""
        self._ready = False
        if self._grpc is not None:
            await self._grpc.stop(grace=5)
        for server in self._uvicorns:
            server.should_exit = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            log.info("stopping")
            await self.stop()

    # -- the pipeline ---------------------------------------------------------------------

    async def _ingest(self, batch: SpanBatch) -> None:
        assert self.store is not None
        if not len(batch):
            return
        await self.store.append_spans(batch)
        self._record_runs(self.engine.observe(batch))

    def _record_runs(self, events: list[RunEvent]) -> None:
        assert self.store is not None
        opened = [e for e in events if isinstance(e, RunOpened)]
        passed = [e for e in events if isinstance(e, RunPassed)]
        self.store.record_runs(opened, passed)

    async def _tick_loop(self) -> None:
        interval = self.settings.tick.total_seconds()
        while True:
            for failure in self.engine.tick():
                task = asyncio.create_task(self._record_failure(failure))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(interval)

    async def _record_failure(self, failure: RunFailed) -> None:
        assert self.store is not None
        rule = self.rules.by_name(failure.rule)
        if rule is None:  # the rule was removed since the run opened
            return
        try:
            # Spans of the trace that no rule looks at may have arrived before the first one the
            # engine saw (children end, and are exported, before their parents): look back from
            # whichever is earlier, the trigger's start or that first arrival, with a margin
            # for clock skew between the client and us.
            since = min(failure.trigger.start_ns, failure.first_received_ns) - _LOOKBACK_NS
            stored = await asyncio.to_thread(self.store.trace_spans_since, failure.trace_id, since)
            spans = [decode_stored_span(raw, res, scope=scope) for raw, res, scope in stored]
            facts = IncidentFacts(
                severity=rule.severity.value, owner=rule.owner, route=rule.route,
                summary=failure_summary(rule, failure),
            )
            await self.store.record_failure(failure, facts, failure_detail(rule, failure, spans))
        except Exception:
            log.exception("could not record the failure of run %s", failure.run_id)
