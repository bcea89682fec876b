"""The outcome engine: live traces, open runs, verdicts.

Contract:
- ``observe(batch)`` takes spans that are already committed and returns what changed (runs opened
  and passed). ``tick()`` returns the runs that failed because their trace went idle or their
  deadline passed. Both are synchronous and do no I/O; the caller persists the events.
- A trigger span opens one run per (rule, trigger span): the run id is derived from both, so a
  retried export (or a restart replaying spans) never opens a second one.
- Only spans whose *name* some selector can match are decoded (attributes, events); the rest cost
  a dictionary lookup each. The name decision is cached per distinct span name.
- A trace is live while it has an open run or a candidate span, until it has been idle for
  ``idle`` (no new span of any kind). Runs of rules with ``within`` wait for their deadline
  instead of the idle time, since their outcome may come from slow asynchronous work.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from outcomewatch.clock import Clock
from outcomewatch.model import FailureReason, RunEvent, RunFailed, RunOpened, RunPassed, Span
from outcomewatch.otlp import SpanBatch
from outcomewatch.rules import Rule, RuleSet, Selector

_CLOSED_MEMORY = 100_000  # run ids remembered after their verdict, to ignore re-sent triggers


def run_id_for(rule: str, trace_id: str, span_id: str) -> str:
    """Deterministic: the same trigger span always maps to the same run."""
    return hashlib.blake2b(f"{rule}\0{trace_id}\0{span_id}".encode(), digest_size=12).hexdigest()


@dataclass(frozen=True, slots=True)
class _Interest:
    """What a span of a given name may be: a trigger of some rules, an outcome of others."""

    triggers: tuple[Rule, ...]
    outcomes: tuple[Selector, ...]


_NO_INTEREST = _Interest((), ())


@dataclass(slots=True)
class _OpenRun:
    run_id: str
    rule: Rule
    trigger: Span
    opened_at: datetime
    deadline_at: datetime | None
    unmet: list[Selector]


@dataclass(slots=True)
class _LiveTrace:
    trace_id: str
    last_seen: datetime
    first_received_ns: int
    candidates: list[Span] = field(default_factory=list)
    runs: dict[str, _OpenRun] = field(default_factory=dict)


class Engine:
    def __init__(self, rules: RuleSet, *, idle: timedelta, clock: Clock) -> None:
        self._idle = idle
        self._clock = clock
        self._live: dict[str, _LiveTrace] = {}
        # (due time, sequence, trace id); an entry may be stale, and is re-checked when popped.
        self._due: list[tuple[datetime, int, str]] = []
        self._sequence = 0
        self._closed: OrderedDict[str, None] = OrderedDict()
        self.load_rules(rules)

    def load_rules(self, rules: RuleSet) -> None:
        self._rules = rules
        self._interest: dict[str, _Interest] = {}

    @property
    def live_traces(self) -> int:
        return len(self._live)

    @property
    def open_runs(self) -> int:
        return sum(len(t.runs) for t in self._live.values())

    def forget_closed(self, run_ids: list[str]) -> None:
        """Mark runs as already decided (used when rebuilding state after a restart)."""
        for run_id in run_ids:
            self._remember_closed(run_id)

    def _interest_in(self, name: str) -> _Interest:
        interest = self._interest.get(name)
        if interest is None:
            triggers = tuple(r for r in self._rules.rules if r.trigger.matches_name(name))
            outcomes = tuple(
                s for r in self._rules.rules for s in r.expect if s.matches_name(name)
            )
            interest = _Interest(triggers, outcomes) if triggers or outcomes else _NO_INTEREST
            self._interest[name] = interest
        return interest

    def observe(self, batch: SpanBatch) -> list[RunEvent]:
        now = self._clock()
        events: list[RunEvent] = []
        for trace_id in set(batch.trace_id):
            live = self._live.get(trace_id)
            if live is not None:
                live.last_seen = now
        for i, name in enumerate(batch.name):
            interest = self._interest.get(name) or self._interest_in(name)
            if interest is _NO_INTEREST:
                continue
            self._observe_span(batch.decode(i), interest, batch.received_ns, now, events)
        return events

    def replay(self, spans: Iterable[tuple[Span, int]]) -> list[RunEvent]:
        """Observe stored (span, received_ns) pairs again, in the order received: rebuilds live
        traces and open runs after a restart. Runs already decided must first be passed to
        ``forget_closed`` so that their re-read triggers open nothing."""
        now = self._clock()
        events: list[RunEvent] = []
        for span, received_ns in spans:
            live = self._live.get(span.trace_id)
            if live is not None:
                live.last_seen = now
            interest = self._interest.get(span.name) or self._interest_in(span.name)
            if interest is not _NO_INTEREST:
                self._observe_span(span, interest, received_ns, now, events)
        return events

    def _observe_span(
        self, span: Span, interest: _Interest, received_ns: int, now: datetime,
        events: list[RunEvent],
    ) -> None:
        is_outcome = any(s.matches(span) for s in interest.outcomes)
        triggered = [r for r in interest.triggers if r.trigger.matches(span)]
        if not is_outcome and not triggered:
            return
        live = self._live.get(span.trace_id)
        if live is None:
            live = _LiveTrace(span.trace_id, now, received_ns)
            self._live[span.trace_id] = live
            self._schedule(live, now + self._idle)
        if is_outcome:
            live.candidates.append(span)
            for run in list(live.runs.values()):
                self._satisfy(run, span, live, now, events)
        for rule in triggered:
            self._open(rule, span, live, now, events)

    def _open(
        self, rule: Rule, trigger: Span, live: _LiveTrace, now: datetime, events: list[RunEvent]
    ) -> None:
        run_id = run_id_for(rule.name, trigger.trace_id, trigger.span_id)
        if run_id in live.runs or run_id in self._closed:
            return
        deadline = None
        if rule.within is not None:
            # From the trigger's start (a root span is exported only when it ends, possibly long
            # after it started), but a client clock ahead of ours must not extend the wait.
            started = min(datetime.fromtimestamp(trigger.start_ns / 1e9, now.tzinfo), now)
            deadline = started + rule.within
            self._schedule(live, deadline)
        run = _OpenRun(run_id, rule, trigger, now, deadline, list(rule.expect))
        live.runs[run_id] = run
        opened = RunOpened(run_id, rule.name, trigger.trace_id, trigger.span_id, now, deadline)
        events.append(opened)
        for candidate in live.candidates:
            self._satisfy(run, candidate, live, now, events)
            if run_id not in live.runs:
                break

    def _satisfy(
        self, run: _OpenRun, span: Span, live: _LiveTrace, now: datetime, events: list[RunEvent]
    ) -> None:
        run.unmet = [s for s in run.unmet if not s.matches(span)]
        if not run.unmet:
            del live.runs[run.run_id]
            self._remember_closed(run.run_id)
            events.append(RunPassed(run.run_id, run.rule.name, live.trace_id, run.opened_at, now))

    def _remember_closed(self, run_id: str) -> None:
        self._closed[run_id] = None
        if len(self._closed) > _CLOSED_MEMORY:
            self._closed.popitem(last=False)

    def _schedule(self, live: _LiveTrace, due: datetime) -> None:
        self._sequence += 1
        heapq.heappush(self._due, (due, self._sequence, live.trace_id))

    def tick(self) -> list[RunFailed]:
        """Fail the runs whose trace went idle or whose deadline passed; forget quiet traces."""
        now = self._clock()
        failed: list[RunFailed] = []
        while self._due and self._due[0][0] <= now:
            _, _, trace_id = heapq.heappop(self._due)
            live = self._live.get(trace_id)
            if live is None:
                continue
            idle_due = live.last_seen + self._idle
            for run in list(live.runs.values()):
                if run.deadline_at is not None:
                    expired, reason = run.deadline_at <= now, FailureReason.DEADLINE
                else:
                    expired, reason = idle_due <= now, FailureReason.TRACE_IDLE
                if expired:
                    del live.runs[run.run_id]
                    self._remember_closed(run.run_id)
                    failed.append(self._failure(run, live, now, reason))
            pending = [r.deadline_at for r in live.runs.values() if r.deadline_at is not None]
            if idle_due > now:
                pending.append(idle_due)
            if pending:
                self._schedule(live, min(pending))
            elif not live.runs:
                del self._live[trace_id]
        return failed

    @staticmethod
    def _failure(
        run: _OpenRun, live: _LiveTrace, now: datetime, reason: FailureReason
    ) -> RunFailed:
        return RunFailed(
            run_id=run.run_id,
            rule=run.rule.name,
            trace_id=live.trace_id,
            trigger=run.trigger,
            opened_at=run.opened_at,
            closed_at=now,
            reason=reason,
            missing=tuple(s.span for s in run.unmet),
            first_received_ns=live.first_received_ns,
        )
