"""The real streaming engine, driven by a manual clock as the server drives it by the wall clock.

``Driver.deliver(batch)`` moves the clock to the batch's ``received_ns``, ticks, then observes
the batch, exactly the order in which the server's tick loop and its ingest path would meet at
that instant. Between deliveries the clock moves on a grid (``grid``), ticking at each step, but
only while the engine holds live state; otherwise it jumps straight to the next delivery, stopping
only where a scheduled slot's grace ends. Verdicts do not depend on the grid: every run due before
a delivery is failed by the tick at that delivery's instant at the latest, grid or no grid. The
grid only makes ``closed_at`` (and incident times) accurate to within one step.

``Verdicts`` collects what the engine decided, one final verdict per run (as the store claims
it with a conditional ``UPDATE ... WHERE status = 'open'``), and feeds the incident book:
``IncidentBook`` keeps every group's state in memory and applies the same lifecycle as the
server (incidents/lifecycle.py), so replay and the server never disagree about an incident.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from outcomewatch.analyzer.engine import Engine
from outcomewatch.analyzer.evidence import failure_summary
from outcomewatch.clock import ManualClock
from outcomewatch.incidents.lifecycle import (
    GroupId,
    GroupState,
    Incident,
    Lifecycle,
    Policy,
    Transition,
    group_key,
    group_of,
)
from outcomewatch.model import (
    FailureReason,
    GroupValues,
    IncidentStatus,
    LateOutcome,
    RunEvent,
    RunFailed,
    RunOpened,
    RunPassed,
    RunStatus,
)
from outcomewatch.otlp import SpanBatch
from outcomewatch.rules import RuleSet
from outcomewatch.rules.policy import policy_of

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)


def at_ns(ns: int) -> datetime:
    """Unix nanoseconds as an aware UTC datetime, exact to the microsecond (no float rounding)."""
    return EPOCH + timedelta(microseconds=ns // 1000)


def ns_of(moment: datetime) -> int:
    return (moment - EPOCH) // ONE_US * 1000


@dataclass(slots=True)
class RunRecord:
    """One run as the store would hold it once everything has been decided."""

    run_id: str
    rule: str
    trace_id: str
    status: RunStatus
    opened_at: datetime
    closed_at: datetime | None = None
    reason: FailureReason | None = None
    missing: tuple[str, ...] = ()
    group: GroupValues = ()
    late: list[str] = field(default_factory=list)


@dataclass(slots=True)
class BookIncident:
    """An incident the verdicts would have opened, with the runs counted in it."""

    incident: Incident
    run_ids: list[str] = field(default_factory=list)
    first_failure: datetime | None = None

    @property
    def rule(self) -> str:
        return self.incident.rule

    @property
    def group(self) -> dict[str, Any]:
        return group_of(self.incident.group_key)

    @property
    def status(self) -> IncidentStatus:
        return self.incident.status

    @property
    def failure_count(self) -> int:
        return self.incident.failure_count

    @property
    def opened_at(self) -> datetime:
        return self.incident.opened_at

    @property
    def last_failure(self) -> datetime:
        return self.incident.last_failure_at

    @property
    def resolved_at(self) -> datetime | None:
        return self.incident.resolved_at


class IncidentBook:
    """The incidents a sequence of verdicts would open, in memory (no database). A person's
    acknowledgements have no place here."""

    def __init__(self, policy: Callable[[str], Policy],
                 summary: Callable[[RunFailed], str] = lambda failure: failure.rule) -> None:
        self._policy = policy
        self._summary = summary
        self._states: dict[GroupId, GroupState] = {}
        self._next = 0
        self._failed_at: dict[str, datetime] = {}
        self.incidents: list[BookIncident] = []
        self.transitions: list[Transition] = []

    @classmethod
    def for_rules(cls, rules: RuleSet) -> IncidentBook:
        def summary(failure: RunFailed) -> str:
            rule = rules.by_name(failure.rule)
            return failure_summary(rule, failure) if rule is not None else failure.rule

        return cls(lambda name: policy_of(rules.by_name(name)), summary)

    def _new_id(self) -> int:
        self._next += 1
        return self._next

    def _apply(self, event: RunFailed | RunPassed) -> None:
        lifecycle = Lifecycle(self._states, self._new_id)
        group = (event.rule, group_key(event.group))
        policy = self._policy(event.rule)
        if isinstance(event, RunPassed):
            lifecycle.passed(group, at=event.closed_at, policy=policy)
        else:
            lifecycle.failed(group, event.run_id, at=event.closed_at,
                             summary=self._summary(event), policy=policy)
        self.transitions.extend(lifecycle.transitions)
        for incident_id in sorted(lifecycle.created):
            self.incidents.append(BookIncident(lifecycle.changed[incident_id]))
        by_id = {b.incident.id: b for b in self.incidents}
        for run_id, incident_id in lifecycle.attached:
            book = by_id[incident_id]
            book.run_ids.append(run_id)
            at = self._failed_at[run_id]
            book.first_failure = at if book.first_failure is None else min(book.first_failure, at)

    def failed(self, failure: RunFailed) -> None:
        self._failed_at[failure.run_id] = failure.closed_at
        self._apply(failure)

    def passed(self, run: RunPassed) -> None:
        self._apply(run)


class Verdicts:
    """Runs in the order they first appeared, each with its one final verdict."""

    def __init__(
        self, book: IncidentBook, *, keep_failure: Callable[[RunFailed], bool] | None = None
    ) -> None:
        self.runs: dict[str, RunRecord] = {}
        self.book = book
        self._keep_failure = keep_failure

    def add(self, events: Iterable[RunEvent]) -> None:
        for event in events:
            if isinstance(event, RunOpened):
                if event.run_id not in self.runs:
                    self.runs[event.run_id] = RunRecord(
                        event.run_id, event.rule, event.trace_id, RunStatus.OPEN, event.opened_at)
            elif isinstance(event, RunPassed):
                record = self._open_record(event.run_id, event.rule, event.trace_id,
                                           event.opened_at)
                if record is not None:
                    record.status, record.closed_at = RunStatus.PASSED, event.closed_at
                    record.group = event.group
                    self.book.passed(event)
            elif isinstance(event, RunFailed):
                if self._keep_failure is not None and not self._keep_failure(event):
                    continue
                record = self._open_record(event.run_id, event.rule, event.trace_id,
                                           event.opened_at)
                if record is not None:
                    record.status, record.closed_at = RunStatus.FAILED, event.closed_at
                    record.reason, record.missing = event.reason, tuple(event.missing)
                    record.group = event.group
                    self.book.failed(event)
            elif isinstance(event, LateOutcome):
                late = self.runs.get(event.run_id)
                if late is not None and event.outcome not in late.late:
                    late.late.append(event.outcome)

    def _open_record(
        self, run_id: str, rule: str, trace_id: str, opened_at: datetime
    ) -> RunRecord | None:
        """The run's record if it may still take a verdict (created if never opened)."""
        record = self.runs.get(run_id)
        if record is None:
            record = self.runs[run_id] = RunRecord(run_id, rule, trace_id, RunStatus.OPEN,
                                                   opened_at)
        return record if record.status is RunStatus.OPEN else None


class Driver:
    """An Engine with a ManualClock that starts at ``start`` (the engine is built then, so a
    scheduled rule's first slot is the first one after ``start``)."""

    def __init__(
        self, rules: RuleSet, *, idle: timedelta, start: datetime, grid: timedelta,
        verdicts: Verdicts,
    ) -> None:
        self.clock = ManualClock(start)
        self.engine = Engine(rules, idle=idle, clock=self.clock)
        self.verdicts = verdicts
        self._grid = grid
        self._schedules = [r.schedule for r in rules if r.schedule is not None]

    def now(self) -> datetime:
        return self.clock()

    def deliver(self, batch: SpanBatch) -> None:
        self.advance_to(at_ns(batch.received_ns))
        self.verdicts.add(self.engine.observe(batch))

    def advance_to(self, target: datetime) -> None:
        """Move the clock to ``target`` (never back), ticking along the way and at ``target``."""
        now = self.clock()
        judged = self._judgements(now, target)
        while now < target:
            busy = self.engine.live_traces > 0 or self.engine.open_runs > 0
            step = min(now + self._grid, target) if busy else target
            while judged and judged[0] <= now:
                judged.pop(0)
            if judged:
                step = min(step, judged[0])
            self.clock.advance(step - now)
            now = step
            self.verdicts.add(self.engine.tick())
        self.verdicts.add(self.engine.tick())

    def _judgements(self, start: datetime, end: datetime) -> list[datetime]:
        """Instants in ``(start, end]`` just after a scheduled slot's grace ends, ascending."""
        moments: set[datetime] = set()
        for schedule in self._schedules:
            window_start = start - schedule.grace
            for slot in schedule.slots_between(window_start, end - schedule.grace):
                moment = slot + schedule.grace + ONE_US
                if start < moment <= end:
                    moments.add(moment)
        return sorted(moments)


def settle_horizon(rules: RuleSet, idle: timedelta) -> timedelta:
    """How long after the last span every run is decided: the longest wait any rule may take
    (``within``, the idle time, a schedule's grace), plus a second."""
    waits = [idle]
    for rule in rules:
        if rule.within is not None:
            waits.append(rule.within)
        if rule.schedule is not None:
            waits.append(rule.schedule.grace)
    return max(waits) + timedelta(seconds=1)
