"""Outcomes from other traces, for rules with ``correlate`` (no I/O, time injected).

Two ways in, both bounded in time by ``horizon`` (the longest ``within`` of a correlated rule),
measured from when the engine saw each span or link:

- by value: an outcome span carrying the trigger's values of every ``correlate`` key;
- by link: a span in trace X with an OTel link into the trigger's trace brings all of X in.

Outcome spans are pooled (by rule and values, and by trace) before any trigger needs them, each
pool bounded per expectation like a live trace's (``runs.Kept``); links are kept by target.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from outcomewatch.analyzer.runs import CorrelationKey, Expect, Kept, OpenRun, SpanKey
from outcomewatch.model import Span

PoolKey = tuple[str, str, Hashable]  # ("values", rule, values) or ("trace", trace id, None)
Candidates = list[tuple[Expect, Span]]
_K = TypeVar("_K", bound=Hashable)


@dataclass(eq=False, slots=True)
class _Pool:
    kept: dict[Expect, Kept] = field(default_factory=dict)
    born: dict[SpanKey, datetime] = field(default_factory=dict)

    def candidates(self, expects: tuple[Expect, ...]) -> Candidates:
        found: Candidates = []
        for e in expects:
            kept = self.kept.get(e)
            if kept is not None:
                found.extend((e, span) for span in kept.spans.values())
        return found


class Correlation:
    def __init__(self, horizon: timedelta) -> None:
        self.horizon = horizon
        self.held = 0  # spans held in pools
        self._pools: dict[PoolKey, _Pool] = {}
        self._born: deque[tuple[datetime, PoolKey, SpanKey]] = deque()
        self._links: dict[str, dict[str, datetime]] = {}  # target trace -> linking traces
        self._link_born: deque[tuple[datetime, str, str]] = deque()
        self._by_values: dict[tuple[str, CorrelationKey], dict[str, OpenRun]] = {}
        self._by_target: dict[str, dict[str, OpenRun]] = {}
        self._by_linked: dict[str, dict[str, OpenRun]] = {}

    def add_outcome(
        self, expect: Expect, span: Span, values: CorrelationKey | None, now: datetime
    ) -> list[OpenRun]:
        """Pool ``span`` (it matches ``expect``); the open runs of other traces it may serve."""
        rule = expect.rule
        runs: list[OpenRun] = []
        if values is not None:
            self._keep(("values", rule.name, values), expect, span, now)
            by_values = self._by_values.get((rule.name, values))
            if by_values:
                runs.extend(run for run in by_values.values() if run.rule is rule)
        self._keep(("trace", span.trace_id, None), expect, span, now)
        linked = self._by_linked.get(span.trace_id)
        if linked:
            runs.extend(run for run in linked.values() if run.rule is rule)
        return runs

    def add_link(
        self, linking: str, target: str, now: datetime
    ) -> list[tuple[OpenRun, Candidates]]:
        """A span of trace ``linking`` links into trace ``target``: the open runs of ``target``
        that adopt ``linking`` now, each with the pooled spans of ``linking`` it may count."""
        if linking == target:
            return []
        self._links.setdefault(target, {})[linking] = now
        self._link_born.append((now, target, linking))
        runs = self._by_target.get(target)
        if not runs:
            return []
        return [(run, self._adopt(run, linking)) for run in list(runs.values())
                if linking not in (run.linked or ())]

    def register(self, run: OpenRun) -> Candidates:
        """Start serving a correlated run; returns the pooled spans it may count already."""
        rule = run.rule
        found: Candidates = []
        if run.values is not None:
            self._by_values.setdefault((rule.name, run.values), {})[run.run_id] = run
            pool = self._pools.get(("values", rule.name, run.values))
            if pool is not None:
                found.extend(pool.candidates(rule.expects))
        self._by_target.setdefault(run.trace_id, {})[run.run_id] = run
        for linking in list(self._links.get(run.trace_id, {})):
            if linking not in (run.linked or ()):
                found.extend(self._adopt(run, linking))
        return found

    def unregister(self, run: OpenRun) -> None:
        if run.values is not None:
            _discard(self._by_values, (run.rule.name, run.values), run.run_id)
        _discard(self._by_target, run.trace_id, run.run_id)
        for linking in run.linked or ():
            _discard(self._by_linked, linking, run.run_id)

    def expire(self, now: datetime) -> None:
        """Forget pooled spans and links seen more than ``horizon`` ago."""
        cutoff = now - self.horizon
        born = self._born
        while born and born[0][0] < cutoff:
            at, pool_key, key = born.popleft()
            pool = self._pools.get(pool_key)
            if pool is None or pool.born.get(key) != at:
                continue
            del pool.born[key]
            for kept in pool.kept.values():
                self.held -= kept.discard(key)
            if not pool.born:
                del self._pools[pool_key]
        link_born = self._link_born
        while link_born and link_born[0][0] < cutoff:
            at, target, linking = link_born.popleft()
            links = self._links.get(target)
            if links is not None and links.get(linking) == at:
                del links[linking]
                if not links:
                    del self._links[target]

    def _keep(self, pool_key: PoolKey, expect: Expect, span: Span, now: datetime) -> None:
        pool = self._pools.get(pool_key)
        if pool is None:
            pool = self._pools[pool_key] = _Pool()
        kept = pool.kept.get(expect)
        if kept is None:
            kept = pool.kept[expect] = Kept(expect.cap, expect.selector.after_trigger)
        if kept.add(span):
            self.held += 1
            key = (span.trace_id, span.span_id)
            if key not in pool.born:
                pool.born[key] = now
                self._born.append((now, pool_key, key))

    def _adopt(self, run: OpenRun, linking: str) -> Candidates:
        if run.linked is None:
            run.linked = set()
        run.linked.add(linking)
        self._by_linked.setdefault(linking, {})[run.run_id] = run
        pool = self._pools.get(("trace", linking, None))
        return pool.candidates(run.rule.expects) if pool is not None else []


def _discard(index: dict[_K, dict[str, OpenRun]], key: _K, run_id: str) -> None:
    runs = index.get(key)
    if runs is not None:
        runs.pop(run_id, None)
        if not runs:
            del index[key]

