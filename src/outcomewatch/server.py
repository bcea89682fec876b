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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.internal import api_implementation
from starlette.types import ASGIApp

from outcomewatch import jsonsafe
from outcomewatch.analyzer.engine import Engine
from outcomewatch.analyzer.evidence import failure_detail, failure_summary
from outcomewatch.api.app import create_app
from outcomewatch.api.routes.rules import ReloadResult
from outcomewatch.clock import Clock, system_clock, to_ns
from outcomewatch.config import NotifyConfig, load_config
from outcomewatch.errors import RuleError
from outcomewatch.incidents.notify import Notifier
from outcomewatch.listeners import Address, EmbeddedUvicorn, serve_asgi
from outcomewatch.metrics import Metrics
from outcomewatch.model import (
    GroupValues,
    LateOutcome,
    RunEvent,
    RunFailed,
    RunOpened,
    RunPassed,
)
from outcomewatch.otlp import SpanBatch, decode_stored_span
from outcomewatch.receiver.grpc import start_grpc_receiver
from outcomewatch.receiver.http import create_http_receiver
from outcomewatch.receiver.limits import Limits
from outcomewatch.rules import Rule, RuleSet, load_rules, rule_files
from outcomewatch.store import retention
from outcomewatch.store.duckdb import IncidentFacts, PassStreak, Store
from outcomewatch.store.incidents import Action, ActionResult
from outcomewatch.store.queries import Reader

log = logging.getLogger(__name__)

_LOOKBACK_NS = 10 * 60 * 1_000_000_000


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
    config: str | None = None  # notification routes and incident settings (YAML)
    api_token: str | None = None  # bearer token for API writes
    api_read_token: str | None = None  # bearer token for API reads
    notify_interval: timedelta = timedelta(seconds=1)  # how often the outbox is polled
    max_live_traces: int | None = None  # over it, the oldest live traces are evaluated early
    max_live_spans: int | None = None  # the same for spans held in memory (a memory budget)
    rules_poll: timedelta = timedelta(seconds=2)  # how often rule files are checked for changes
    otlp_token: str | None = None  # bearer token required from OTLP clients
    tls_cert: str | None = None  # PEM certificate chain: TLS on all three listeners
    tls_key: str | None = None  # PEM private key for tls_cert
    max_queue: int = 1024  # span jobs queued for the writer before exports get UNAVAILABLE
    retention: timedelta | None = timedelta(days=14)  # spans of passed / run-less traces
    evidence_retention: timedelta | None = timedelta(days=90)  # spans of failed runs' traces
    retention_interval: timedelta = timedelta(minutes=10)  # how often retention runs


class Server:
    def __init__(self, settings: Settings, *, clock: Clock = system_clock) -> None:
        self.settings = settings
        self.clock = clock
        self.rules: RuleSet = load_rules(list(settings.rules))
        self.loaded_at = clock()
        self._rule_files_seen = self._rule_files_signature()
        self.notify: NotifyConfig = load_config(settings.config)
        self.metrics = Metrics()
        self.metrics.rules_reloaded(ok=True, at=self.loaded_at.timestamp())
        self.engine = self._new_engine({})
        self._evicted_seen = 0
        self.store: Store | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.api_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._uvicorns: list[EmbeddedUvicorn] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._serving: list[asyncio.Task[None]] = []  # the uvicorn servers: stopped gracefully
        self._ready = False
        self._notifier: Notifier | None = None
        self._reload_lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if api_implementation.Type() != "upb":
            log.warning("protobuf uses the %s backend; ingest will be ~100x slower than with upb",
                        api_implementation.Type())
        Path(self.settings.db).parent.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.settings.db, max_queue=self.settings.max_queue,
                           on_commit=self.metrics.storage_write_seconds.observe)
        self.metrics.watch_open_incidents(self.store.open_incident_counts)
        self.metrics.watch_notification_queue(self.store.notification_queue, self.clock)
        # Scheduled rules go on from where the last process stopped judging their slots.
        self.engine = self._new_engine(await asyncio.to_thread(self.store.schedule_progress))
        await self._recover()
        self._grpc, self.grpc_port = await start_grpc_receiver(
            self._ingest_from("grpc"), host=self.settings.grpc.host, port=self.settings.grpc.port,
            limits=self.settings.limits, token=self.settings.otlp_token, tls=self._tls_pair(),
            on_refused=self._refused_on("grpc"),
        )
        http_app = create_http_receiver(self._ingest_from("http"), limits=self.settings.limits,
                                        token=self.settings.otlp_token,
                                        on_refused=self._refused_on("http"))
        api_app = create_app(
            Reader(self.store.conn), ready=lambda: self._ready and self.store is not None
            and self.store.healthy, actions=self._act, api_token=self.settings.api_token,
            read_token=self.settings.api_read_token, metrics=self.metrics.render, rules=self,
        )
        self.http_port = await self._serve_asgi(http_app, self.settings.http)
        self.api_port = await self._serve_asgi(api_app, self.settings.api)
        self._background.append(asyncio.create_task(self._tick_loop()))
        self._background.append(asyncio.create_task(self._watch_rule_files()))
        self._background.append(asyncio.create_task(self._retention_loop()))
        self._notifier = Notifier(
            self.store, self.notify, clock=self.clock,
            on_attempt=lambda target, delivered: self.metrics.notifications.labels(
                target, "sent" if delivered else "failed").inc(),
        )
        self._background.append(asyncio.create_task(
            self._notifier.run_forever(interval=self.settings.notify_interval)))
        self._warn_unrouted()
        self._ready = True
        log.info(
            "outcomewatch serving: OTLP/gRPC %s:%d, OTLP/HTTP %s:%d, API http://%s:%d; %d rules",
            self.settings.grpc.host, self.grpc_port, self.settings.http.host, self.http_port,
            self.settings.api.host, self.api_port, len(self.rules.rules),
        )

    def _recovery_window(self) -> timedelta:
        """How far back a restart reads spans again: the idle time, and long enough for the
        triggers of schedule slots not yet judged and for outcomes still awaited (a rule's
        ``within``: held outcome spans, correlated ones included)."""
        window = self.settings.trace_idle
        for rule in self.rules.rules:
            if rule.schedule is not None:
                window = max(window, 2 * rule.schedule.grace)
            if rule.within is not None:  # outcomes held for a long-running trigger
                window = max(window, rule.within)
        return window

    async def _recover(self) -> None:
        """Rebuild live traces and open runs from the database, so that a restart (even after
        kill -9) neither forgets a run nor gives a verdict twice: verdicts already stored are
        skipped, and storing is idempotent (run ids are derived from the trigger span)."""
        assert self.store is not None
        window = int(self._recovery_window().total_seconds() * 1e9)
        # Back from now, and back from the last span stored: the process may have been down for
        # longer than the window, and the verdict writes of the last exports it acknowledged
        # (queued after their spans' commit) may never have been committed.
        last = await asyncio.to_thread(self.store.last_received_ns)
        since = min(to_ns(self.clock()), last if last is not None else to_ns(self.clock()))
        rows = await asyncio.to_thread(self.store.recovery_spans, since - window)
        if not rows:
            return
        spans = [(decode_stored_span(raw, res, scope=scope), received)
                 for raw, res, scope, received in rows]
        decided = await asyncio.to_thread(
            self.store.decided_run_ids, sorted({span.trace_id for span, _ in spans}))
        self.engine.forget_closed(decided)
        self._handle(self.engine.replay(spans))
        log.info("recovered %d spans: %d live traces, %d open runs",
                 len(spans), self.engine.live_traces, self.engine.open_runs)


    # -- rules: hot reload ----------------------------------------------------------------

    async def reload(self) -> ReloadResult:
        """Load the rule files again. An invalid set is rejected with its problems and the
        running rules stay; a valid one replaces them for new spans (open runs keep the rule
        they were opened with). One reload at a time (file change, SIGHUP, API)."""
        async with self._reload_lock:
            signature = await asyncio.to_thread(self._rule_files_signature)
            try:
                rules = await asyncio.to_thread(load_rules, list(self.settings.rules))
            except RuleError as exc:
                log.error("rule reload rejected, %d problem(s); the old rules keep running:\n%s",
                          len(exc.problems), exc)
                self._rule_files_seen = signature
                self.metrics.rules_reloaded(ok=False, at=self.clock().timestamp())
                return ReloadResult(len(self.rules.rules), exc.problems, self.loaded_at)
            self.rules = rules
            self.engine.load_rules(rules)
            self.loaded_at = self.clock()
            self._rule_files_seen = signature
            self.metrics.rules_reloaded(ok=True, at=self.loaded_at.timestamp())
            log.info("reloaded %d rules", len(rules.rules))
            self._warn_unrouted()
            return ReloadResult(len(rules.rules), (), self.loaded_at)

    def _rule_files_signature(self) -> tuple[tuple[str, int, int], ...]:
        try:
            files = rule_files(list(self.settings.rules))
        except RuleError:
            return ()
        signature = []
        for path in files:
            with contextlib.suppress(OSError):
                stat = path.stat()
                signature.append((str(path), stat.st_mtime_ns, stat.st_size))
        return tuple(signature)

    async def _watch_rule_files(self) -> None:
        """Reload when a rule file is added, removed or changed (polled: no extra dependency,
        and it works the same on network file systems and in containers)."""
        interval = self.settings.rules_poll.total_seconds()
        while True:
            await asyncio.sleep(interval)
            signature = await asyncio.to_thread(self._rule_files_signature)
            if signature != self._rule_files_seen:
                try:
                    await self.reload()
                except Exception:  # the watcher must outlive any one bad reload
                    log.exception("rule reload failed")

    async def _act(
        self, incident_id: int, action: Action, *, actor: str, comment: str | None
    ) -> ActionResult:
        """A person's acknowledge / resolve / reopen, from the API."""
        assert self.store is not None
        # By the incident's own (stored) route: a rule's route may have changed since it opened.
        routes = {route: self.notify.targets_for(route) for route in self.notify.routes}
        return await self.store.act(incident_id, action, actor=actor, comment=comment,
                                    at=self.clock(), targets_for_route=routes)

    def _new_engine(self, schedule_since: dict[str, datetime]) -> Engine:
        return Engine(
            self.rules, idle=self.settings.trace_idle, clock=self.clock,
            max_live_traces=self.settings.max_live_traces,
            max_live_spans=self.settings.max_live_spans, schedule_since=schedule_since,
        )

    def _warn_unrouted(self) -> None:
        """A rule whose route has no target gets no notifications: say so once, at start."""
        if not self.notify.routes:
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
            except Exception:  # a failing disk: the next round tries again
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
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._notifier is not None:
            await self._notifier.aclose()
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

    # -- the pipeline ---------------------------------------------------------------------

    def _refused_on(self, transport: str) -> Callable[[str], None]:
        def refused(reason: str) -> None:
            self.metrics.requests_refused.labels(transport, reason).inc()

        return refused

    def _ingest_from(self, transport: str) -> Callable[[SpanBatch], Awaitable[None]]:
        received = self.metrics.spans_received.labels(transport)
        rejected = self.metrics.spans_rejected.labels(transport)

        async def ingest(batch: SpanBatch) -> None:
            if batch.rejected:
                rejected.inc(batch.rejected)
            await self._ingest(batch)
            received.inc(len(batch))

        return ingest

    async def _ingest(self, batch: SpanBatch) -> None:
        if len(batch):
            # Shielded: a client that gives up (deadline, disconnect) while its spans commit
            # must not leave them stored but never observed.
            await asyncio.shield(self._commit_and_observe(batch))

    async def _commit_and_observe(self, batch: SpanBatch) -> None:
        assert self.store is not None
        await self.store.append_spans(batch)
        self._handle(self.engine.observe(batch))

    def _handle(self, events: Sequence[RunEvent]) -> None:
        """Persist what the engine decided, queued to the writer in the engine's order (the
        writer is FIFO): a pass never overtakes an earlier failure of the same rule, and a late
        outcome always finds its failed run. A failure's evidence is read afterwards, off the
        loop, and attached to the already stored failure."""
        assert self.store is not None
        opened: list[RunOpened] = []
        passed: list[RunPassed] = []

        def flush() -> None:
            assert self.store is not None
            if opened or passed:
                self.store.record_runs(list(opened), list(passed), self._streaks(passed))
                opened.clear()
                passed.clear()

        for event in events:
            if isinstance(event, RunOpened):
                self.metrics.run_opened(event.rule)
                opened.append(event)
                continue
            if isinstance(event, RunPassed):
                self.metrics.run_decided(event.rule, "passed",
                                         (event.closed_at - event.opened_at).total_seconds())
                passed.append(event)
                continue
            flush()
            if isinstance(event, LateOutcome):
                self.metrics.late_outcomes.labels(event.rule).inc()
                self.store.record_late_outcomes([event])
            else:
                self.metrics.run_decided(event.rule, "failed",
                                         (event.closed_at - event.opened_at).total_seconds())
                self._record_failure(event)
        flush()

    def _streaks(self, passed: Sequence[RunPassed]) -> list[PassStreak]:
        runs: dict[tuple[str, str], list[str]] = {}
        for run in passed:
            runs.setdefault((run.rule, group_key(run.group)), []).append(run.run_id)
        streaks = []
        for (name, key), run_ids in runs.items():
            rule = self.rules.by_name(name)
            streaks.append(PassStreak(
                name, key, tuple(run_ids), rule.resolve_after if rule else None,
                self.notify.targets_for(rule.route) if rule else ()))
        return streaks

    async def _tick_loop(self) -> None:
        interval = self.settings.tick.total_seconds()
        saved: dict[str, datetime] = {}
        last_probe = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                assert self.store is not None
                if not self.store.healthy and loop.time() - last_probe > 5:
                    # Storage failed and nothing may be writing: try a write now and then, so
                    # /readyz turns ready again once the disk has room, without traffic.
                    last_probe = loop.time()
                    self.store.submit(lambda db: db.execute(
                        "UPDATE schema_version SET version = version"))
                self._handle(self.engine.tick())
                progress = self.engine.schedule_progress()
                if progress != saved:
                    # Queued after the missed slots' failures (FIFO), so stored after them: a
                    # slot reported twice is harmless (deterministic run ids), one lost is not.
                    self.store.save_schedule_progress(progress)
                    saved = progress
                self.metrics.evicted_traces.inc(self.engine.evicted_traces - self._evicted_seen)
                self._evicted_seen = self.engine.evicted_traces
                self.metrics.live_traces.set(self.engine.live_traces)
                self.metrics.open_runs.set(self.engine.open_runs)
            except Exception:
                # One bad tick must not stop every later verdict.
                log.exception("tick failed")
            await asyncio.sleep(interval)

    def _facts(self, failure: RunFailed, rule: Rule | None) -> IncidentFacts:
        if rule is None:  # removed by a reload while the run was open: still judged, and kept
            return IncidentFacts(
                severity="warning", owner="", route="", group_key=group_key(failure.group),
                summary=f"{failure.rule} (no longer loaded): {', '.join(failure.missing)} "
                        f"missing, reason {failure.reason.value}",
                reopen_window=self.notify.reopen_window)
        return IncidentFacts(
            severity=rule.severity.value, owner=rule.owner, route=rule.route,
            summary=failure_summary(rule, failure), description=rule.description,
            group_key=group_key(failure.group), open_after=rule.open_after,
            resolve_after=rule.resolve_after,
            reopen_window=rule.reopen_within or self.notify.reopen_window,
            targets=self.notify.targets_for(rule.route),
        )

    def _record_failure(self, failure: RunFailed) -> None:
        assert self.store is not None
        rule = self.rules.by_name(failure.rule)
        self.store.record_failure_now(failure, self._facts(failure, rule))
        if rule is not None and failure.trigger is not None:
            task = asyncio.create_task(self._attach_evidence(failure, rule))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif rule is not None:
            self.store.attach_evidence(failure.run_id, failure_detail(rule, failure, []))

    async def _attach_evidence(self, failure: RunFailed, rule: Rule) -> None:
        assert self.store is not None and failure.trigger is not None
        store = self.store
        # Spans of the trace that no rule looks at may have arrived before the first one the
        # engine saw (children end, and are exported, before their parents): look back from
        # whichever is earlier, the trigger's start or that first arrival, with a margin for
        # clock skew between the client and us.
        since = min(failure.trigger.start_ns, failure.first_received_ns) - _LOOKBACK_NS
        # Up to the trace's newest span (spans arriving after the verdict are not evidence),
        # with a margin: the bound only spares DuckDB the row groups of later traffic.
        until = (failure.last_received_ns + _LOOKBACK_NS) if failure.last_received_ns else None

        def build() -> dict[str, Any]:  # off the loop: a big trace takes a while to decode
            stored = store.trace_spans_since(failure.trace_id, since, until)
            spans = [decode_stored_span(raw, res, scope=scope) for raw, res, scope in stored]
            return failure_detail(rule, failure, spans)

        try:
            store.attach_evidence(failure.run_id, await asyncio.to_thread(build))
        except Exception:
            log.exception("could not read the evidence of failed run %s", failure.run_id)


def group_key(group: GroupValues) -> str:
    """The stored key of a group_by value set: canonical JSON ('' for an ungrouped rule)."""
    return jsonsafe.dumps(dict(group), sort_keys=True) if group else ""
