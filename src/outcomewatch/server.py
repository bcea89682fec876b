"""Wiring only: builds the pieces, starts the listeners and the loops, stops them.

One asyncio loop runs the OTLP receivers, the query API, the engine's clock tick, the rule
watcher, retention and the notifier, around one Store (the DuckDB writer thread). What happens to
an export is the pipeline's (pipeline.py); where rules come from, the rule source's
(rules/source.py); how verdicts and incidents are stored, the store's (store/verdicts.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.internal import api_implementation
from starlette.types import ASGIApp

from outcomewatch.analyzer.engine import Engine
from outcomewatch.api.app import create_app
from outcomewatch.clock import Clock, system_clock, to_ns
from outcomewatch.config import NotifyConfig, load_config
from outcomewatch.errors import StoreError
from outcomewatch.incidents.notify import Notifier
from outcomewatch.listeners import Address, EmbeddedUvicorn, serve_asgi
from outcomewatch.metrics import Metrics
from outcomewatch.offline.replay import ReplayReport, backtest, replay_on
from outcomewatch.offline.suggest import suggest
from outcomewatch.otlp import SpanBatch
from outcomewatch.pipeline import Pipeline
from outcomewatch.receiver.decode_pool import DecodePool
from outcomewatch.receiver.grpc import start_grpc_receiver
from outcomewatch.receiver.http import create_http_receiver
from outcomewatch.receiver.limits import Limits
from outcomewatch.rules import RuleSet
from outcomewatch.rules.source import ReloadResult, RuleSource
from outcomewatch.store import retention
from outcomewatch.store.duckdb import Store
from outcomewatch.store.incidents import Action, ActionResult
from outcomewatch.store.queries import Reader

log = logging.getLogger(__name__)

_PROBE_EVERY_S = 5.0  # how often a failed store is probed with a write


@dataclass(frozen=True)
class Settings:
    """Everything ``outcomewatch serve`` can be told; the CLI builds it once."""

    rules: tuple[str, ...] = ("rules",)
    db: str = "data/outcomewatch.duckdb"
    grpc: Address = Address("127.0.0.1", 4317)
    http: Address = Address("127.0.0.1", 4318)
    api: Address = Address("127.0.0.1", 8080)
    trace_idle: timedelta = timedelta(seconds=10)
    # How often the engine's clock advances and its decisions go to the writer as one batch.
    # A batch costs a fixed ~25 calls into DuckDB: at 100 ms the typical mix (1 trace in 10
    # opening a run) acknowledged ~81k spans/s, at 200 ms ~100k, for ~50 ms more latency
    # on average (bench_verdicts.py; verdict p99 still well under --trace-idle + 500 ms).
    tick: timedelta = timedelta(milliseconds=200)
    limits: Limits = field(default_factory=Limits)
    config: str | None = None  # notification routes and incident settings (YAML)
    api_token: str | None = None  # bearer token for API writes
    api_read_token: str | None = None  # bearer token for API reads
    notify_interval: timedelta = timedelta(seconds=1)  # how often the outbox is polled
    max_live_traces: int | None = None  # over it, the oldest live traces are evaluated early
    max_live_spans: int | None = None  # the same for spans held in memory (a memory budget)
    max_live_bytes: int | None = None  # the same for live state's estimated bytes (CLI: derived)
    rules_poll: timedelta = timedelta(seconds=2)  # how often rule files are checked for changes
    otlp_token: str | None = None  # bearer token required from OTLP clients
    tls_cert: str | None = None  # PEM certificate chain: TLS on all three listeners
    tls_key: str | None = None  # PEM private key for tls_cert
    max_queue: int = 1024  # span jobs queued for the writer before exports get UNAVAILABLE
    decode_workers: int = 0  # processes decoding OTLP/protobuf (receiver/decode_pool.py)
    retention: timedelta | None = timedelta(days=14)  # spans of passed / run-less traces
    evidence_retention: timedelta | None = timedelta(days=90)  # spans of failed runs' traces
    retention_interval: timedelta = timedelta(minutes=10)  # how often retention runs


class Server:
    """``start()`` / ``stop()`` (or ``run_until_signalled()``); ``pipeline.tick()`` may be called
    directly by tests that drive the clock themselves."""

    def __init__(self, settings: Settings, *, clock: Clock = system_clock) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()
        self.source = RuleSource(
            settings.rules, clock=clock, on_load=self._take_rules,
            on_reload=lambda ok, at: self.metrics.rules_reloaded(ok=ok, at=at.timestamp()))
        self.metrics.rules_reloaded(ok=True, at=self.source.loaded_at.timestamp())
        self.notify: NotifyConfig = load_config(settings.config)
        self.engine = self._new_engine({})
        self.store: Store | None = None
        self.pipeline: Pipeline | None = None
        self.decoder: DecodePool | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.api_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._uvicorns: list[EmbeddedUvicorn] = []
        self._background: list[asyncio.Task[None]] = []
        self._serving: list[asyncio.Task[None]] = []  # the uvicorn servers: stopped gracefully
        self._ready = False
        self._notifier: Notifier | None = None
        self._backtest_lock = asyncio.Lock()
        self._warned_no_routes = False

    # -- what the API's rules admin reads -------------------------------------------------

    @property
    def rules(self) -> RuleSet:
        return self.source.rules

    @property
    def loaded_at(self) -> datetime:
        return self.source.loaded_at

    @property
    def last_reload(self) -> ReloadResult | None:
        return self.source.last_reload

    async def reload(self) -> ReloadResult:
        return await self.source.reload()

    def _take_rules(self, rules: RuleSet) -> None:
        self.engine.load_rules(rules)
        self._warn_unrouted()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if api_implementation.Type() != "upb":
            log.warning("protobuf uses the %s backend; ingest will be ~100x slower than with upb",
                        api_implementation.Type())
        Path(self.settings.db).parent.mkdir(parents=True, exist_ok=True)
        self.store = store = Store(self.settings.db, max_queue=self.settings.max_queue,
                                   on_commit=self.metrics.storage_write_seconds.observe)
        self.metrics.watch_open_incidents(store.open_incident_counts)
        self.metrics.watch_notification_queue(store.notification_queue, self.clock)
        # Scheduled rules go on from where the last process stopped judging their slots.
        self.engine = self._new_engine(await asyncio.to_thread(store.schedule_progress))
        self.pipeline = Pipeline(self.engine, store, rules=lambda: self.source.rules,
                                 notify=self.notify, metrics=self.metrics, clock=self.clock)
        await self.pipeline.recover(self.settings.trace_idle)
        self.decoder = DecodePool(self.settings.decode_workers, self.settings.limits)
        await self.decoder.start()
        self._grpc, self.grpc_port = await start_grpc_receiver(
            self._ingest_from("grpc"), host=self.settings.grpc.host, port=self.settings.grpc.port,
            limits=self.settings.limits, token=self.settings.otlp_token, tls=self._tls_pair(),
            on_refused=self._refused_on("grpc"), decoder=self.decoder,
        )
        http_app = create_http_receiver(self._ingest_from("http"), limits=self.settings.limits,
                                        token=self.settings.otlp_token,
                                        on_refused=self._refused_on("http"), decoder=self.decoder)
        api_app = create_app(
            Reader(store.conn, trace_idle=self.settings.trace_idle),
            ready=lambda: self._ready and store.healthy, actions=self._act,
            api_token=self.settings.api_token, read_token=self.settings.api_read_token,
            metrics=self.metrics.render, rules=self, backtest=self._backtest,
            suggest=self._suggest,
        )
        self.http_port = await self._serve_asgi(http_app, self.settings.http)
        self.api_port = await self._serve_asgi(api_app, self.settings.api)
        self._background.append(asyncio.create_task(self._tick_loop()))
        self._background.append(asyncio.create_task(self.source.watch(self.settings.rules_poll)))
        self._background.append(asyncio.create_task(self._retention_loop()))
        self._notifier = Notifier(
            store, self.notify, clock=self.clock,
            on_attempt=lambda target, delivered: self.metrics.notifications.labels(
                target, "sent" if delivered else "failed").inc(),
        )
        self._background.append(asyncio.create_task(
            self._notifier.run_forever(interval=self.settings.notify_interval)))
        loop, notifier = asyncio.get_running_loop(), self._notifier

        def wake() -> None:  # on the writer thread: new outbox rows are committed
            loop.call_soon_threadsafe(notifier.wake)

        store.on_transitions = wake
        self._warn_unrouted()
        self._ready = True
        log.info(
            "outcomewatch serving: OTLP/gRPC %s:%d, OTLP/HTTP %s:%d, API http://%s:%d; "
            "database %s; %d rules from %s; live-state budget %s",
            self.settings.grpc.host, self.grpc_port, self.settings.http.host, self.http_port,
            self.settings.api.host, self.api_port, self.settings.db, len(self.rules.rules),
            ", ".join(self.source.files()) or "no file",
            f"{self.settings.max_live_bytes / 2**20:.0f} MiB (--max-live-bytes)"
            if self.settings.max_live_bytes else "none",
        )

    async def _act(
        self, incident_id: int, action: Action, *, actor: str, comment: str | None
    ) -> ActionResult:
        """A person's acknowledge / resolve / reopen, from the API."""
        assert self.store is not None
        # By the incident's own (stored) route: a rule's route may have changed since it opened.
        routes = {route: self.notify.targets_for(route) for route in self.notify.routes}
        result = await self.store.act(incident_id, action, actor=actor, comment=comment,
                                      at=self.clock(), targets_for_route=routes)
        if result.changed and self._notifier is not None:
            self._notifier.wake()
        return result

    async def _backtest(self, rules_yaml: str, *, since: timedelta | None,
                        trace_idle: timedelta | None) -> dict[str, Any]:
        """POST /api/v1/replay: one at a time, off the loop, on a read transaction."""
        assert self.store is not None
        conn = self.store.conn
        since_ns = None if since is None else to_ns(self.clock() - since)
        async with self._backtest_lock:
            return await asyncio.to_thread(
                backtest, conn, rules_yaml, since_ns=since_ns,
                idle=trace_idle or self.settings.trace_idle)

    def _suggest(self, *, since: timedelta, trigger: str, min_traces: int) -> dict[str, Any]:
        """GET /api/v1/suggestions (in the API's threadpool): proposals over the stored spans,
        each backtested on a read transaction of the server's own database."""
        assert self.store is not None
        conn = self.store.conn
        since_ns = to_ns(self.clock() - since)

        def backtest_rules(rules: RuleSet) -> ReplayReport:
            cursor = conn.cursor()
            try:
                cursor.begin()
                return replay_on(cursor, rules, since_ns=since_ns, idle=self.settings.trace_idle)
            finally:
                cursor.close()

        return suggest(conn, since_ns=since_ns, trigger=trigger, min_traces=min_traces,
                       backtest=backtest_rules)

    def _new_engine(self, schedule_since: dict[str, datetime]) -> Engine:
        return Engine(
            self.source.rules, idle=self.settings.trace_idle, clock=self.clock,
            max_live_traces=self.settings.max_live_traces,
            max_live_spans=self.settings.max_live_spans,
            max_live_bytes=self.settings.max_live_bytes, schedule_since=schedule_since,
        )

    def _warn_unrouted(self) -> None:
        """A rule whose route has no target gets no notifications: say so once."""
        if not self.notify.routes:
            if not self._warned_no_routes:
                self._warned_no_routes = True
                log.warning("no notification routes (--config): incidents are stored and shown "
                            "by the API and the console, but announced nowhere")
            return
        for rule in self.rules.rules:
            if rule.route and not self.notify.targets_for(rule.route):
                log.warning("rule %s: route %r has no notification target in the config",
                            rule.name, rule.route)

    def _tls_pair(self) -> tuple[bytes, bytes] | None:
        if not self.settings.tls_cert or not self.settings.tls_key:
            return None
        return Path(self.settings.tls_key).read_bytes(), Path(self.settings.tls_cert).read_bytes()

    async def _serve_asgi(self, app: ASGIApp, address: Address) -> int:
        serving = await serve_asgi(app, address, tls_cert=self.settings.tls_cert,
                                   tls_key=self.settings.tls_key)
        self._uvicorns.append(serving.server)
        self._serving.append(serving.task)
        return serving.port

    # -- retention ------------------------------------------------------------------------

    async def apply_retention(self) -> retention.Deleted:
        """Delete spans past --retention / --evidence-retention (see store/retention.py)."""
        assert self.store is not None
        policy = retention.Policy(spans=self.settings.retention,
                                  evidence=self.settings.evidence_retention)
        deleted = await retention.apply(self.store, policy, now=self.clock())
        self.metrics.spans_deleted.labels("passed").inc(deleted.spans)
        self.metrics.spans_deleted.labels("evidence").inc(deleted.evidence)
        return deleted

    async def _retention_loop(self) -> None:
        interval = self.settings.retention_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            try:
                await self.apply_retention()
            except StoreError as exc:  # a failing disk: one line; the next round tries again
                log.error("retention failed: %s", exc)
            except Exception:
                log.exception("retention failed")

    async def stop(self) -> None:
        """Stop accepting, let in-flight exports finish, store pending verdicts, close the file."""
        self._ready = False
        if self._grpc is not None:
            await self._grpc.stop(grace=5)
        for server in self._uvicorns:
            server.should_exit = True  # uvicorn finishes the requests it is serving
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._serving:
            _, pending = await asyncio.wait(self._serving, timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._serving, return_exceptions=True)
        if self._notifier is not None:
            await self._notifier.aclose()
        if self.decoder is not None:
            await self.decoder.close()
        if self.pipeline is not None:
            self.pipeline.flush()  # decided but not yet queued: stored before the file closes
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        await self.start()
        try:
            await stop.wait()
        finally:
            log.info("stopping")
            await self.stop()

    # -- the loops around the pipeline ----------------------------------------------------

    def _refused_on(self, transport: str) -> Callable[[str], None]:
        def refused(reason: str) -> None:
            self.metrics.requests_refused.labels(transport, reason).inc()

        return refused

    def _ingest_from(self, transport: str) -> Callable[[SpanBatch], Awaitable[None]]:
        received = self.metrics.spans_received.labels(transport)
        rejected = self.metrics.spans_rejected.labels(transport)

        async def ingest(batch: SpanBatch) -> None:
            assert self.pipeline is not None
            if batch.rejected:
                rejected.inc(batch.rejected)
            await self.pipeline.ingest(batch)
            received.inc(len(batch))

        return ingest

    async def _tick_loop(self) -> None:
        interval = self.settings.tick.total_seconds()
        last_probe = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                assert self.store is not None and self.pipeline is not None
                if not self.store.healthy and loop.time() - last_probe > _PROBE_EVERY_S:
                    # Storage failed and nothing may be writing: try a write now and then, so
                    # /readyz turns ready again once the disk has room, without traffic.
                    last_probe = loop.time()
                    self.store.submit(lambda db: db.execute(
                        "UPDATE schema_version SET version = version").fetchall())
                self.pipeline.tick()
            except Exception:
                # One bad tick must not stop every later verdict.
                log.exception("tick failed")
            await asyncio.sleep(interval)
