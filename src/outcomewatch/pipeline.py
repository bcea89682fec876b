"""The verdict path: ingest -> commit -> observe -> one verdict batch per tick.

``ingest(batch)`` stamps the spans' received_ns, commits them (the export may be acknowledged
once it returns), then lets the engine observe them. Stamped here, in the order the writer
commits, and never going back: so received_ns grows with the spans table (the trace index and
recovery rely on it), whatever order the decode workers returned the exports in.

``tick()`` advances the engine's time, and everything the engine decided since the last tick
(observed and ticked) goes to the writer as one VerdictBatch (store/verdicts.py writes it
set-based, applying the incident lifecycle): a batch costs a fixed handful of statements, so
batching per tick (200 ms in the server, see server.Settings.tick) rather than per export is
what keeps rule-matching traffic near the speed of the rest. ``tick()`` is synchronous and
callable directly, so tests drive it instead of waiting for the server's loop, which only
schedules it; ``flush()`` writes what is pending without advancing time.

The writer is FIFO, so batches are stored in the engine's order: a run's opening before its
verdict, a pass never before an earlier failure of the same rule, a late outcome after its
failed run. Failures carry what the verdict knows in memory (analyzer/evidence.py); the rest of
the incident file is built from the stored trace when it is read.

A verdict batch also carries the *watermark*: every span stamped before it has been observed,
and what the engine decided from it is in this batch or an earlier one. A restart reads again
the spans from an idle time before the stored watermark (and every trace with an open run): a
kill -9 loses the verdicts still in memory or queued, never the spans they came from, however
far the verdict writes lagged behind the spans. On quiet traffic (no events) the watermark is
written alone, at most every WATERMARK_EVERY.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from outcomewatch.analyzer.engine import Engine
from outcomewatch.analyzer.evidence import evidence_keys, failure_summary, verdict_detail
from outcomewatch.clock import Clock, to_ns
from outcomewatch.config import NotifyConfig
from outcomewatch.metrics import Metrics
from outcomewatch.model import (
    LateOutcome,
    RunAtRisk,
    RunEvent,
    RunFailed,
    RunOpened,
    RunPassed,
)
from outcomewatch.otlp import SpanBatch
from outcomewatch.otlp_decode import decode_stored_span
from outcomewatch.rules import RuleSet
from outcomewatch.rules.policy import policy_of
from outcomewatch.store.verdicts import Judged, VerdictBatch

log = logging.getLogger(__name__)

WATERMARK_EVERY_NS = 1_000_000_000  # a restart re-reads at most this much more than it must
_FIRST_NS = -(2**62)  # before any span (and far enough from BIGINT's least for a window back)


class VerdictWriter(Protocol):
    """What the pipeline needs of the store (the Store class, or a test's own)."""

    async def append_spans(self, batch: SpanBatch) -> None: ...

    def write_verdicts(self, batch: VerdictBatch) -> None: ...

    def save_schedule_progress(self, progress: dict[str, datetime]) -> None: ...

    def last_received_ns(self) -> int | None: ...

    def observed_before_ns(self) -> int | None: ...

    def span_names(self, since_ns: int, until_ns: int) -> list[str]: ...

    def recovery_spans(
        self, since_ns: int, *, all_since_ns: int | None = None, names: Sequence[str] = (),
    ) -> list[tuple[bytes, bytes, str, int, str]]: ...

    def decided_run_ids(self, trace_ids: Sequence[str]) -> list[str]: ...


def unloaded_summary(failure: RunFailed) -> str:
    return (f"{failure.rule} (no longer loaded): {', '.join(failure.missing)} missing, "
            f"reason {failure.reason.value}")


class Pipeline:
    def __init__(
        self, engine: Engine, writer: VerdictWriter, *, rules: Callable[[], RuleSet],
        notify: NotifyConfig, metrics: Metrics, clock: Clock,
    ) -> None:
        self.engine = engine
        self.writer = writer
        self._rules = rules
        self.notify = notify
        self.metrics = metrics
        self._clock = clock
        self._schedule_saved: dict[str, datetime] = {}
        self._evicted_seen = 0
        self._pending: list[RunEvent] = []  # decided since the last write, in engine order
        self._next_stamp = to_ns(clock())  # the least received_ns the next batch may get
        self._in_flight: set[int] = set()  # stamps of batches committing, not yet observed
        self._watermark_written: int | None = None

    async def ingest(self, batch: SpanBatch) -> None:
        """Commit ``batch``, then observe it; returns once the spans are durable."""
        if len(batch):
            # Shielded: a client that gives up (deadline, disconnect) while its spans commit
            # must not leave them stored but never observed.
            await asyncio.shield(self._commit_and_observe(batch))

    async def _commit_and_observe(self, batch: SpanBatch) -> None:
        stamp = max(to_ns(self._clock()), self._next_stamp)
        self._next_stamp = stamp + 1
        batch.stamp(stamp)
        self._in_flight.add(stamp)
        try:
            # Queued synchronously (before the first await): commit order is stamp order.
            await self.writer.append_spans(batch)
            self.persist(self.engine.observe(batch))
        finally:
            # Also on failure: the export is refused, so the client sends it again.
            self._in_flight.discard(stamp)

    def watermark(self) -> int:
        """The received_ns before which every span has been observed (its events pending or
        written): the oldest batch still committing, else the next stamp."""
        return min(self._in_flight, default=self._next_stamp)

    def tick(self) -> None:
        """Advance the engine to the clock's now and store what it decided since the last
        tick."""
        self.persist(self.engine.tick())
        self.flush()
        progress = self.engine.schedule_progress()
        if progress != self._schedule_saved:
            # Queued after the missed slots' failures (FIFO), so stored after them: a slot
            # reported twice is harmless (deterministic run ids), one lost is not.
            self.writer.save_schedule_progress(progress)
            self._schedule_saved = progress
        self.metrics.evicted_traces.inc(self.engine.evicted_traces - self._evicted_seen)
        self._evicted_seen = self.engine.evicted_traces
        self.metrics.live_traces.set(self.engine.live_traces)
        self.metrics.live_bytes.set(self.engine.live_bytes)
        self.metrics.open_runs.set(self.engine.open_runs)

    def persist(self, events: Sequence[RunEvent]) -> None:
        """Keep ``events`` for the next write (``flush``, or the next tick)."""
        self._pending.extend(events)

    def flush(self) -> None:
        """Queue what is pending to the writer as one batch (counted in the metrics), with the
        watermark; with nothing pending, the watermark alone if it moved by WATERMARK_EVERY."""
        watermark = self.watermark()
        if not self._pending and self._watermark_written is not None \
                and watermark - self._watermark_written < WATERMARK_EVERY_NS:
            return
        events, self._pending = self._pending, []
        batch = self.batch(events)
        batch.observed_before_ns = self._watermark_written = watermark
        self.writer.write_verdicts(batch)

    def batch(self, events: Sequence[RunEvent]) -> VerdictBatch:
        rules = self._rules()
        batch = VerdictBatch()
        for event in events:
            if isinstance(event, RunOpened):
                self.metrics.run_opened(event.rule)
                batch.events.append(event)
                continue
            if isinstance(event, RunAtRisk):
                batch.events.append(event)
                continue
            if isinstance(event, LateOutcome):
                self.metrics.late_outcomes.labels(event.rule).inc()
                batch.events.append(event)
                continue
            rule = rules.by_name(event.rule)
            if event.rule not in batch.policies:
                policy = batch.policies[event.rule] = policy_of(
                    rule, reopen_window=self.notify.reopen_window)
                batch.targets[policy.route] = self.notify.targets_for(policy.route)
            seconds = (event.closed_at - event.opened_at).total_seconds()
            if isinstance(event, RunPassed):
                self.metrics.run_decided(event.rule, "passed", seconds)
                batch.events.append(Judged(event))
                continue
            self.metrics.run_decided(event.rule, "failed", seconds)
            if rule is None:
                batch.events.append(Judged(event, unloaded_summary(event)))
            else:
                batch.events.append(Judged(event, failure_summary(rule, event),
                                           verdict_detail(rule, event),
                                           evidence_keys(rule, event)))
        return batch

    def recovery_window(self, trace_idle: timedelta) -> timedelta:
        """How far back a restart reads spans again: the idle time, and long enough for the
        triggers of schedule slots not yet judged and for outcomes still awaited (a rule's
        ``within``: held outcome spans, correlated ones included)."""
        window = trace_idle
        for rule in self._rules().rules:
            if rule.schedule is not None:
                window = max(window, 2 * rule.schedule.grace)
            if rule.within is not None:
                window = max(window, rule.within)
        return window

    async def recover(self, trace_idle: timedelta) -> None:
        """Rebuild live traces and open runs from the database, so that a restart (even after
        kill -9) neither forgets a run nor gives a verdict twice: verdicts already stored are
        skipped, and storing is idempotent (run ids derive from the trigger span, verdicts are
        claimed)."""
        window = int(self.recovery_window(trace_idle).total_seconds() * 1e9)
        # Back from the stored watermark: the spans after it may have been observed by the last
        # process without what it decided from them being stored (see the module docstring).
        # And back from now and from the last span stored, whichever is earliest: the process
        # may have been down for longer than the window.
        now = to_ns(self._clock())
        last = await asyncio.to_thread(self.writer.last_received_ns)
        observed = await asyncio.to_thread(self.writer.observed_before_ns)
        since = now
        if last is not None:
            # NULL: no batch said what had been observed, so none of the stored spans is known to.
            since = min(now, last, _FIRST_NS if observed is None else observed)
        # Past the idle time only the spans a rule looks at can still matter (an outcome held
        # for a long ``within``): read only those, or a restart would decode every span of the
        # last hours (millions under load, gigabytes of memory). Correlated rules hold spans
        # by their links and ids, whatever their names: then the whole window is read.
        idle = int(trace_idle.total_seconds() * 1e9)
        names: list[str] = []
        all_since = since - window
        if window > idle and not self.engine.correlates:
            all_since = since - idle
            names = self.engine.interesting(await asyncio.to_thread(
                self.writer.span_names, since - window, all_since))
        rows = await asyncio.to_thread(self.writer.recovery_spans, since - window,
                                       all_since_ns=all_since, names=names)
        if not rows:
            return
        decided = await asyncio.to_thread(
            self.writer.decided_run_ids, sorted({row[4] for row in rows}))
        self.engine.forget_closed(decided)
        # Decoded one at a time as the engine replays them: a model.Span weighs several times
        # its stored bytes, and the engine keeps only the few a rule holds.
        self.persist(self.engine.replay(
            (decode_stored_span(raw, res, scope=scope), received)
            for raw, res, scope, received, _ in rows))
        self.flush()
        log.info("recovered %d spans: %d live traces, %d open runs",
                 len(rows), self.engine.live_traces, self.engine.open_runs)
