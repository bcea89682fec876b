"""Late outcomes: expected outcomes that show up after their run has failed (no I/O).

A failed run's unmet expectations are remembered, by the run's trace (and, for a correlated
rule, by the trigger's correlate values), for at most ``keep`` of clock time and for the
``limit`` most recent failed runs. A matching span reports each (run, expectation) once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import datetime, timedelta

from outcomewatch.analyzer.runs import CompiledRule, CorrelationKey, Expect, OpenRun
from outcomewatch.model import LateOutcome, Span

LATE_LIMIT = 10_000
LATE_KEEP = timedelta(hours=24)


@dataclass(eq=False, slots=True)
class _Failed:
    run_id: str
    rule: CompiledRule
    trace_id: str
    trigger: Span
    values: CorrelationKey | None
    unmet: list[Expect]
    at: datetime


class LateOutcomes:
    def __init__(self, *, limit: int = LATE_LIMIT, keep: timedelta = LATE_KEEP) -> None:
        self._limit = limit
        self._keep = keep
        self._runs: OrderedDict[str, _Failed] = OrderedDict()
        self._by_trace: dict[Hashable, dict[str, _Failed]] = {}
        self._by_values: dict[Hashable, dict[str, _Failed]] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def remember(self, run: OpenRun, now: datetime) -> None:
        unmet = run.unmet()
        if not unmet or run.run_id in self._runs:
            return
        failed = _Failed(run.run_id, run.rule, run.trace_id, run.trigger, run.values, unmet, now)
        self._runs[run.run_id] = failed
        self._by_trace.setdefault(run.trace_id, {})[run.run_id] = failed
        if run.values is not None:
            self._by_values.setdefault((run.rule.name, run.values), {})[run.run_id] = failed
        while len(self._runs) > self._limit:
            self._forget(next(iter(self._runs)))

    def match(
        self, expect: Expect, span: Span, values: CorrelationKey | None, now: datetime
    ) -> list[LateOutcome]:
        """The late outcomes ``span`` (which matches ``expect``) brings."""
        found = list(self._by_trace.get(span.trace_id, {}).values())
        if values is not None:
            found.extend(self._by_values.get((expect.rule.name, values), {}).values())
        events: list[LateOutcome] = []
        for failed in dict.fromkeys(found):
            if (
                failed.rule is not expect.rule
                or expect not in failed.unmet
                or not expect.counts(span, failed.trigger)
            ):
                continue
            failed.unmet.remove(expect)
            events.append(
                LateOutcome(failed.run_id, failed.rule.name, failed.trace_id,
                            expect.selector.span, now)
            )
            if not failed.unmet:
                self._forget(failed.run_id)
        return events

    def expire(self, now: datetime) -> None:
        cutoff = now - self._keep
        while self._runs:
            oldest = next(iter(self._runs.values()))
            if oldest.at >= cutoff:
                break
            self._forget(oldest.run_id)

    def _forget(self, run_id: str) -> None:
        failed = self._runs.pop(run_id, None)
        if failed is None:
            return
        _discard(self._by_trace, failed.trace_id, run_id)
        if failed.values is not None:
            _discard(self._by_values, (failed.rule.name, failed.values), run_id)


def _discard(index: dict[Hashable, dict[str, _Failed]], key: Hashable, run_id: str) -> None:
    runs = index.get(key)
    if runs is not None:
        runs.pop(run_id, None)
        if not runs:
            del index[key]
