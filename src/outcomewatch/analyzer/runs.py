"""Compiled rules and the state the engine holds per live trace and per open run (no I/O).

See the engine module docstring for the semantics; this module is their bookkeeping: which spans
a trace keeps for runs that may still open (``Kept``, bounded per selector) and how an open run
counts the spans offered to it and what its verdict is (``OpenRun.settle``).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from outcomewatch.model import AttributeValue, FailureReason, GroupValues, Span
from outcomewatch.rules import Rule, RuleSet, Selector

SpanKey = tuple[str, str]  # (trace id, span id): distinct spans, whatever trace they are in
CorrelationKey = tuple[Hashable, ...]
PASS: Literal["pass"] = "pass"
Verdict = FailureReason | Literal["pass"]


def run_id_for(rule: str, trace_id: str, span_id: str) -> str:
    """Deterministic: the same trigger span always maps to the same run. Stored ids depend on
    it: never change it."""
    return hashlib.blake2b(f"{rule}\0{trace_id}\0{span_id}".encode(), digest_size=12).hexdigest()


def span_key(span: Span) -> SpanKey:
    return (span.trace_id, span.span_id)


def _ns(d: timedelta) -> int:
    return (d // timedelta(microseconds=1)) * 1000


# -- what live state costs in memory, estimated for the byte budget (``max_live_bytes``) -------
# Bytes on CPython 3.11, 64-bit, measured with tracemalloc (bench/bench_memory.py prints the
# measured figures beside these estimates). A trace's own state: LiveTrace, its dicts, its entry
# in the engine's index and due heap; a selector's Kept (with its first span's key); an open
# run's: OpenRun, its id, its deadline and heap entry. Held spans are counted by ``span_bytes``.
TRACE_BYTES = 480
KEPT_BYTES = 450
RUN_BYTES = 430
NEAR_BYTES = 120  # one near miss held by a trace (plus its strings)
MAX_AT_RISK = 5  # near misses reported per run
MAX_NEAR = 4  # near misses a trace holds for runs opened after them
_SPAN_BYTES = 420  # a decoded Span without attributes: the object, its ids, an empty dict
_EVENT_BYTES = 320
_LINK_BYTES = 340
_ENTRY_BYTES = 71  # a dict entry and its key's str header
_STR_BYTES = 49
_SCALAR_BYTES = 32


def span_bytes(span: Span) -> int:
    """The memory a decoded span holds, estimated from the lengths of its strings and the
    numbers of its values (within ~10% of tracemalloc's figure for typical spans). Its resource
    is shared with the other spans of its request, and not counted."""
    size = _SPAN_BYTES + len(span.name) + len(span.status_message)
    size += _mapping_bytes(span.attributes)
    for event in span.events:
        size += _EVENT_BYTES + len(event.name) + _mapping_bytes(event.attributes)
    for link in span.links:
        size += _LINK_BYTES + _mapping_bytes(link.attributes)
    return size


def _mapping_bytes(values: Mapping[str, AttributeValue]) -> int:
    # Strings first, by exact type: most values are, and this runs for every span kept.
    size = _ENTRY_BYTES * len(values)
    for key, value in values.items():
        size += len(key) + (_STR_BYTES + len(value) if type(value) is str
                            else _value_bytes(value))
    return size


def _value_bytes(value: AttributeValue) -> int:
    if isinstance(value, str):
        return _STR_BYTES + len(value)
    if isinstance(value, list):
        return 56 + sum(8 + _value_bytes(item) for item in value)
    if isinstance(value, dict):
        return 64 + _mapping_bytes(value)
    return _SCALAR_BYTES


@dataclass(eq=False, slots=True)
class Expect:
    """One ``expect`` item of a compiled rule.

    ``need``: matches required (1 without ``count``, else ``count.gte`` or 0; 0 = optional);
    ``most``: ``count.lte`` or None; ``cap``: the most distinct matching spans worth holding for
    a run (``most + 1`` shows a surplus; without ``most``, ``need`` suffice)."""

    rule: CompiledRule
    index: int
    selector: Selector
    need: int
    most: int | None
    cap: int

    def counts(self, span: Span, trigger: Span) -> bool:
        """Whether ``span`` (which matches the selector) counts for a run of ``trigger``."""
        return not self.selector.after_trigger or span.start_ns >= trigger.start_ns


@dataclass(eq=False, slots=True)
class Forbid:
    rule: CompiledRule
    selector: Selector
    cap: int = 1  # one forbidden span is enough


@dataclass(eq=False, slots=True)
class CompiledRule:
    rule: Rule
    expects: tuple[Expect, ...] = ()
    forbids: tuple[Forbid, ...] = ()
    bounded: bool = False  # some expectation has an upper count bound: no pass before the wait
    max_duration_ns: int | None = None
    open: int = 0  # open runs: a replaced rule is kept for them until they are decided

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def correlated(self) -> bool:
        return bool(self.rule.correlate)


def compile_rules(rules: RuleSet) -> tuple[CompiledRule, ...]:
    compiled: list[CompiledRule] = []
    for rule in rules.rules:
        c = CompiledRule(rule)
        expects = []
        for j, selector in enumerate(rule.expect):
            count = selector.count
            # No count: at least one. A count without gte (``{lte: 1}``) allows none.
            need = 1 if count is None else count.gte or 0
            most = None if count is None else count.lte
            cap = need if most is None else most + 1
            expects.append(Expect(c, j, selector, need, most, cap))
        c.expects = tuple(expects)
        c.forbids = tuple(Forbid(c, selector) for selector in rule.forbid)
        c.bounded = any(e.most is not None for e in expects)
        c.max_duration_ns = _ns(rule.max_duration) if rule.max_duration is not None else None
        compiled.append(c)
    return tuple(compiled)


def reload_rules(
    current: tuple[CompiledRule, ...], retired: tuple[CompiledRule, ...], rules: RuleSet
) -> tuple[tuple[CompiledRule, ...], tuple[CompiledRule, ...]]:
    """The compiled ``rules`` (an unchanged rule keeps its compiled object, so its state), and
    the replaced rules that still have open runs."""
    previous = {r.name: r for r in current}
    compiled = []
    for new in compile_rules(rules):
        old = previous.get(new.name)
        if old is not None and same_definition(old.rule, new.rule):
            old.rule = new.rule
            new = old
        compiled.append(new)
    kept = {id(r) for r in compiled}
    still_open = tuple(r for r in (*retired, *current) if id(r) not in kept and r.open)
    return tuple(compiled), still_open


@dataclass(frozen=True, slots=True)
class Interest:
    """What a span of a given name may be: a trigger of some rules, an expected or a forbidden
    outcome of others (expectations that need nothing and bound nothing are left out)."""

    triggers: tuple[CompiledRule, ...]
    expects: tuple[Expect, ...]
    forbids: tuple[Forbid, ...]


NO_INTEREST = Interest((), (), ())


def same_definition(a: Rule, b: Rule) -> bool:
    """Whether two rules judge runs alike (whatever their file, line, owner or wording)."""
    return replace(a, source=b.source, line=b.line, description=b.description, owner=b.owner,
                   route=b.route, severity=b.severity, evidence=b.evidence) == b


def interest_in(
    rules: tuple[CompiledRule, ...], name: str, retired: tuple[CompiledRule, ...] = ()
) -> Interest:
    """``retired``: rules replaced by a reload that still have open runs (outcomes only)."""
    triggers = tuple(r for r in rules if r.rule.trigger.matches_name(name))
    both = (*rules, *retired)
    expects = tuple(
        e for r in both for e in r.expects if e.cap and e.selector.matches_name(name)
    )
    forbids = tuple(f for r in both for f in r.forbids if f.selector.matches_name(name))
    if not (triggers or expects or forbids):
        return NO_INTEREST
    return Interest(triggers, expects, forbids)


def _hashable(value: AttributeValue) -> Hashable:
    """Typed, as ``where`` equality: "1" is not 1, True is not 1, 1 is 1.0."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, str):
        return ("str", value)
    return ("json", json.dumps(value, sort_keys=True, default=str))


def correlation_key(span: Span, keys: tuple[str, ...]) -> CorrelationKey | None:
    """The span's values of ``keys`` (attributes, then resource); None if one is missing."""
    values: list[Hashable] = []
    for key in keys:
        value = span.lookup(key)
        if value is None:
            return None
        values.append(_hashable(value))
    return tuple(values)


def group_values(rule: Rule, trigger: Span) -> GroupValues:
    return tuple((key, trigger.lookup(key)) for key in rule.group_by)


_NO_HEAP: list[tuple[int, SpanKey]] = []  # shared by every Kept without ``latest``; never grown


class Kept:
    """At most ``cap`` distinct spans matching one selector. ``latest`` (for ``after: trigger``)
    keeps the ``cap`` latest-starting ones: if ``k`` spans start after a trigger, the ``k``
    latest-starting spans all do, so the answer for any trigger that comes later is exact.
    ``bytes``: the estimated memory of the spans kept (``span_bytes``)."""

    __slots__ = ("_heap", "bytes", "cap", "latest", "spans")

    def __init__(self, cap: int, latest: bool) -> None:
        self.cap = cap
        self.latest = latest
        self.bytes = 0
        self.spans: dict[SpanKey, Span] = {}
        # (start_ns, key), lazily pruned; only ``latest`` needs one (one list less per trace).
        self._heap = [] if latest else _NO_HEAP

    def add(self, span: Span) -> int:
        """Keep ``span`` if it is worth keeping; returns how many more spans are held (0/1)."""
        key = (span.trace_id, span.span_id)
        if key in self.spans:
            return 0
        if len(self.spans) < self.cap:
            self.spans[key] = span
            self.bytes += span_bytes(span)
            if self.latest:
                heapq.heappush(self._heap, (span.start_ns, key))
            return 1
        if not self.latest or not self.spans:
            return 0
        while self._heap[0][1] not in self.spans:
            heapq.heappop(self._heap)
        start, oldest = self._heap[0]
        if span.start_ns <= start:
            return 0
        heapq.heapreplace(self._heap, (span.start_ns, key))
        self.bytes += span_bytes(span) - span_bytes(self.spans.pop(oldest))
        self.spans[key] = span
        return 0

    def discard(self, key: SpanKey) -> int:
        span = self.spans.pop(key, None)
        if span is None:
            return 0
        self.bytes -= span_bytes(span)
        return 1

    def __len__(self) -> int:
        return len(self.spans)


@dataclass(eq=False, slots=True)
class OpenRun:
    run_id: str
    rule: CompiledRule
    trigger: Span
    opened_at: datetime
    deadline_at: datetime | None
    group: GroupValues
    values: CorrelationKey | None  # the trigger's correlate values (None: not correlated)
    # Per expectation: the distinct spans counted; None until the first (a dict less each).
    matched: list[dict[SpanKey, Span] | None]
    forbidden: Span | None = None
    linked: set[str] | None = None  # other traces linked to the trigger's (None: none yet)
    at_risk: int = 0  # RunAtRisk events given (bounded by MAX_AT_RISK)
    cost: int = 0  # the bytes the engine's budget counts for the run while it is open

    @property
    def trace_id(self) -> str:
        return self.trigger.trace_id

    def counted(self, expect: Expect) -> int:
        matched = self.matched[expect.index]
        return 0 if matched is None else len(matched)

    def wants(self, expect: Expect) -> bool:
        """Whether another matching span could still change this run's verdict."""
        return expect.most is not None or self.counted(expect) < expect.need

    def offer(self, expect: Expect, span: Span) -> bool:
        """Count ``span`` (it matches ``expect``'s selector); True if it counted."""
        if not self.wants(expect) or not expect.counts(span, self.trigger):
            return False
        matched = self.matched[expect.index]
        if matched is None:
            matched = self.matched[expect.index] = {}
        key = (span.trace_id, span.span_id)
        if key in matched:
            return False
        matched[key] = span
        return True

    def unmet(self) -> list[Expect]:
        return [e for e in self.rule.expects if self.counted(e) < e.need]

    def missing(self) -> tuple[str, ...]:
        return tuple(e.selector.span for e in self.unmet())

    def surplus(self) -> tuple[Span, ...]:
        """The spans counted beyond an upper bound, in the order they were counted."""
        extra: list[Span] = []
        for e in self.rule.expects:
            matched = self.matched[e.index]
            if e.most is not None and matched is not None and len(matched) > e.most:
                extra.extend(list(matched.values())[e.most:])
        return tuple(extra)

    def last_outcome_end_ns(self) -> int:
        ends = [s.end_ns for matched in self.matched if matched for s in matched.values()]
        return max(ends, default=self.trigger.start_ns)

    def settle(self, wait_over: FailureReason | None) -> Verdict | None:
        """The verdict now, or None to keep waiting. ``wait_over`` is the reason to fail with
        when the wait has ended (deadline, idle trace), None while it lasts."""
        if self.forbidden is not None:
            return FailureReason.FORBIDDEN
        if self.surplus():
            return FailureReason.COUNT
        if self.unmet():
            return wait_over
        limit = self.rule.max_duration_ns
        if limit is not None and self.last_outcome_end_ns() - self.trigger.start_ns > limit:
            return FailureReason.MAX_DURATION
        if self.rule.bounded and wait_over is None:
            return None
        return PASS


@dataclass(eq=False, slots=True)
class LiveTrace:
    """A trace the engine holds state for: kept candidate spans and open runs.

    Its outcomes are offered to its open runs by a scan of ``runs`` (filtered by rule): an index
    per expectation cost ~500 bytes per run, and a trace holds a few runs, not thousands."""

    trace_id: str
    last_seen: datetime
    first_received_ns: int
    kept: dict[Expect | Forbid, Kept] = field(default_factory=dict)
    runs: dict[str, OpenRun] = field(default_factory=dict)
    held: int = 0  # kept spans + triggers of open runs
    had_run: bool = False  # once a run opened here, its outcomes no longer wait for a trigger
    last_received_ns: int = 0  # when its newest span arrived (bounds the evidence query)
    bytes: int = TRACE_BYTES  # estimated memory: own state, kept spans, open runs (+ triggers)
    # Near misses (see model.RunAtRisk) seen before a trigger: (expectation, name, message).
    near: list[tuple[Expect, str, str]] | None = None

    def keep_near(self, expect: Expect, name: str, message: str) -> int:
        """Hold a near miss for runs opened later (at most MAX_NEAR); the bytes added."""
        if self.near is None:
            self.near = []
        if len(self.near) >= MAX_NEAR:
            return 0
        self.near.append((expect, name, message))
        cost = NEAR_BYTES + len(name) + len(message)
        self.bytes += cost
        return cost

    def keep(self, what: Expect | Forbid, span: Span) -> int:
        """Keep ``span`` for ``what`` if worth it; returns how many more spans are held (0/1).
        ``bytes`` follows (a replaced span may change it when none is added)."""
        kept = self.kept.get(what)
        if kept is None:
            after = isinstance(what, Expect) and what.selector.after_trigger
            kept = self.kept[what] = Kept(what.cap, after)
            self.bytes += KEPT_BYTES
        before = kept.bytes
        added = kept.add(span)
        self.held += added
        self.bytes += kept.bytes - before
        return added

    def waiting(self, expect: Expect) -> list[OpenRun]:
        """The open runs of this trace that ``expect`` belongs to and that still want spans."""
        return [run for run in self.runs.values() if run.rule is expect.rule and run.wants(expect)]
