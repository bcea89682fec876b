"""Missed scheduled runs: a slot of a rule's ``schedule`` with no trigger start near it (no I/O).

Each slot is judged once, when the clock is past ``slot + grace``: it is kept when some trigger
span of the rule started within ``[slot - grace, slot + grace]`` (by the span's own start time,
the client's clock), else it is reported as a RunFailed with reason ``missed``. A trigger span
is used up by the first slot it keeps, so one start never covers two slots. Progress (the last
slot judged, per rule) is exposed so that a restart neither re-judges nor skips a slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from outcomewatch.analyzer.runs import SpanKey, run_id_for
from outcomewatch.model import FailureReason, RunFailed, Span
from outcomewatch.rules import Rule, Schedule

_MAX_STARTS = 10_000  # trigger starts remembered per rule, waiting for their slot
_SEARCH = (timedelta(minutes=1), timedelta(days=3660))  # first and last window for a next slot


def next_slot(schedule: Schedule, after: datetime) -> datetime | None:
    """The first slot after ``after`` (UTC), None if there is none in the next ten years."""
    window, longest = _SEARCH
    while window <= longest:
        slots = schedule.slots_between(after, after + window)
        if slots:
            return slots[0]
        window *= 2
    return None


def _aware(moment: datetime) -> datetime:
    # A timestamp read back from a database may have lost its zone; stored values are UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _ns(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


@dataclass(eq=False, slots=True)
class _Watch:
    rule: Rule
    schedule: Schedule
    judged: datetime  # slots after this instant are still to be judged
    next: datetime | None
    starts: dict[SpanKey, int] = field(default_factory=dict)  # unused trigger starts (ns)
    used: dict[SpanKey, int] = field(default_factory=dict)  # starts that kept a slot

    @property
    def earliest_useful_ns(self) -> int | None:
        """Starts before this can keep no slot still to be judged."""
        if self.next is None:
            return None
        return _ns(self.next - self.schedule.grace)


class ScheduleWatch:
    def __init__(
        self, rules: Iterable[Rule], since: Mapping[str, datetime] | None, now: datetime
    ) -> None:
        self._watches: dict[str, _Watch] = {}
        for rule in rules:
            if rule.schedule is None:
                continue
            start = _aware(since[rule.name]) if since and rule.name in since else now
            self._watches[rule.name] = _Watch(
                rule, rule.schedule, start, next_slot(rule.schedule, start)
            )

    def reload(self, rules: Iterable[Rule], now: datetime) -> None:
        """New rules: an unchanged schedule keeps its progress; a new or changed one starts
        from ``now``; a removed one is forgotten."""
        watches: dict[str, _Watch] = {}
        for rule in rules:
            if rule.schedule is None:
                continue
            watch = self._watches.get(rule.name)
            if watch is not None and watch.schedule == rule.schedule:
                watch.rule = rule
            else:
                watch = _Watch(rule, rule.schedule, now, next_slot(rule.schedule, now))
            watches[rule.name] = watch
        self._watches = watches

    def __bool__(self) -> bool:
        return bool(self._watches)

    def saw(self, rule: Rule, trigger: Span) -> None:
        """A trigger span of ``rule`` (matched in full): it may keep a slot."""
        watch = self._watches.get(rule.name)
        if watch is None:
            return
        earliest = watch.earliest_useful_ns
        key = (trigger.trace_id, trigger.span_id)
        if earliest is None or trigger.start_ns < earliest or key in watch.used:
            return
        watch.starts[key] = trigger.start_ns
        if len(watch.starts) > _MAX_STARTS:
            # Over the bound: keep the starts nearest the next slot.
            kept = sorted(watch.starts.items(), key=lambda item: item[1])[:_MAX_STARTS]
            watch.starts = dict(kept)

    def due(self, now: datetime) -> list[RunFailed]:
        """Judge every slot whose grace has passed; the missed ones, oldest first."""
        missed: list[RunFailed] = []
        for watch in self._watches.values():
            while watch.next is not None and now > watch.next + watch.schedule.grace:
                slot = watch.next
                if not self._keeps(watch, slot):
                    missed.append(self._missed(watch.rule, slot, now))
                watch.judged = slot
                watch.next = next_slot(watch.schedule, slot)
                self._prune(watch)
        return missed

    def progress(self) -> dict[str, datetime]:
        """Per scheduled rule, the instant up to which its slots have been judged."""
        return {name: watch.judged for name, watch in self._watches.items()}

    @staticmethod
    def _keeps(watch: _Watch, slot: datetime) -> bool:
        grace = watch.schedule.grace
        low, high = _ns(slot - grace), _ns(slot + grace)
        near = [(start, key) for key, start in watch.starts.items() if low <= start <= high]
        if not near:
            return False
        start, key = min(near)
        del watch.starts[key]
        watch.used[key] = start
        return True

    @staticmethod
    def _prune(watch: _Watch) -> None:
        earliest = watch.earliest_useful_ns
        if earliest is None:
            watch.starts.clear()
            watch.used.clear()
            return
        watch.starts = {k: s for k, s in watch.starts.items() if s >= earliest}
        watch.used = {k: s for k, s in watch.used.items() if s >= earliest}

    @staticmethod
    def _missed(rule: Rule, slot: datetime, now: datetime) -> RunFailed:
        return RunFailed(
            run_id=run_id_for(rule.name, "schedule", slot.isoformat()),
            rule=rule.name,
            trace_id="",
            trigger=None,
            opened_at=slot,
            closed_at=now,
            reason=FailureReason.MISSED,
            missing=(rule.trigger.span,),
            first_received_ns=0,
            group=tuple((key, None) for key in rule.group_by),
        )

