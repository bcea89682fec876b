"""Compiled rules: span predicates built once at load time, cheap to call on the hot path.

Matching semantics (the contract the rule file format promises):

- ``span`` and ``service`` are fnmatch globs (``*``, ``?``, ``[...]``), case-sensitive; a pattern
  without glob characters is compared for plain equality.
- ``service`` is the span's ``service.name`` resource attribute (``Span.service``).
- ``where`` looks a key up in the span's attributes, then in its resource's (``Span.lookup``).
- Equality is typed: ``"1"`` never equals ``1``, ``True`` never equals ``1``, ``1`` equals ``1.0``.
- ``regex`` must match the whole value (``re.fullmatch``) and only string values can match.
- ``gt``/``gte``/``lt``/``lte`` only hold for int and float values (never bool).
- A missing attribute fails every operator except the negative ones: ``exists: false``, ``ne``
  and ``not_in`` hold for it (the value is indeed not equal / not in the list). Add
  ``exists: true`` to require presence.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

from outcomewatch.model import AttributeValue, Severity, Span, SpanStatus
from outcomewatch.rules.schedule import Schedule

Scalar = str | bool | int | float
Number = int | float

_GLOB_CHARS = frozenset("*?[")


def compile_glob(pattern: str) -> re.Pattern[str] | None:
    """A compiled fnmatch pattern, or None when ``pattern`` has no glob characters."""
    if _GLOB_CHARS.isdisjoint(pattern):
        return None
    return re.compile(fnmatch.translate(pattern))


def _glob_matches(pattern: str, compiled: re.Pattern[str] | None, value: str) -> bool:
    if compiled is None:
        return value == pattern
    return compiled.match(value) is not None


def same_value(value: AttributeValue, expected: Scalar) -> bool:
    """Typed equality of an attribute value and a rule's scalar (see the module docstring)."""
    # bool is checked first because bool is a subclass of int in Python.
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(expected, bool) and isinstance(value, bool) and value == expected
    if isinstance(expected, int | float):
        return isinstance(value, int | float) and value == expected
    return isinstance(value, str) and value == expected


def _number(value: AttributeValue) -> Number | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


@dataclass(frozen=True, repr=False)
class Condition:
    """One ``where`` entry: the attribute ``key`` and the operators that must all hold.

    ``equals`` is the scalar form (``key: value``); the other fields are the operators of the
    mapping form. None means "not given" (rule values are never None).
    """

    key: str
    equals: Scalar | None = None
    in_: tuple[Scalar, ...] | None = None
    not_in: tuple[Scalar, ...] | None = None
    regex: re.Pattern[str] | None = None
    exists: bool | None = None
    ne: Scalar | None = None
    gt: Number | None = None
    gte: Number | None = None
    lt: Number | None = None
    lte: Number | None = None

    def __repr__(self) -> str:
        # Only the operators given: a condition uses one or two of its ten fields.
        given = [f"{name}={value!r}" for name, value in vars(self).items() if value is not None]
        return f"Condition({', '.join(given)})"

    def holds(self, span: Span) -> bool:
        present = span.has(self.key)
        if self.exists is not None and present != self.exists:
            return False
        if not present:
            # Only negative operators can hold for a missing value.
            return (
                self.equals is None
                and self.in_ is None
                and self.regex is None
                and self.gt is None
                and self.gte is None
                and self.lt is None
                and self.lte is None
            )
        value = span.lookup(self.key)
        if self.equals is not None and not same_value(value, self.equals):
            return False
        if self.in_ is not None and not any(same_value(value, v) for v in self.in_):
            return False
        if self.not_in is not None and any(same_value(value, v) for v in self.not_in):
            return False
        if self.ne is not None and same_value(value, self.ne):
            return False
        if self.regex is not None and not (
            isinstance(value, str) and self.regex.fullmatch(value) is not None
        ):
            return False
        return self._compares(value)

    def _compares(self, value: AttributeValue) -> bool:
        if self.gt is None and self.gte is None and self.lt is None and self.lte is None:
            return True
        number = _number(value)
        if number is None:
            return False
        return (
            (self.gt is None or number > self.gt)
            and (self.gte is None or number >= self.gte)
            and (self.lt is None or number < self.lt)
            and (self.lte is None or number <= self.lte)
        )


@dataclass(frozen=True)
class Bounds:
    """How many matching spans an expectation needs: ``gte <= n <= lte``; None is unbounded."""

    gte: int | None = None
    lte: int | None = None

    def admits(self, n: int) -> bool:
        return (self.gte is None or n >= self.gte) and (self.lte is None or n <= self.lte)


@dataclass(frozen=True)
class DurationBounds:
    """Bounds on a span's duration; every bound given must hold (None: not given)."""

    lt: timedelta | None = None
    lte: timedelta | None = None
    gt: timedelta | None = None
    gte: timedelta | None = None

    def admits(self, d: timedelta) -> bool:
        return self.admits_ns(_ns(d))

    def admits_ns(self, ns: int) -> bool:
        """``admits`` for a duration in nanoseconds (exact: a timedelta stops at microseconds)."""
        return (
            (self.lt is None or ns < _ns(self.lt))
            and (self.lte is None or ns <= _ns(self.lte))
            and (self.gt is None or ns > _ns(self.gt))
            and (self.gte is None or ns >= _ns(self.gte))
        )


def _ns(d: timedelta) -> int:
    return (d // timedelta(microseconds=1)) * 1000


@dataclass(frozen=True)
class Selector:
    """Which spans a trigger, an expectation or a forbidden outcome matches.

    ``span`` is the pattern as written; the analyzer uses it as the name of a missing
    expectation. Globs are compiled once, at construction.

    ``count`` and ``after_trigger`` (expectations only) need the run's context, so ``matches``
    ignores them: ``count`` is how many distinct matching spans the expectation needs (None:
    at least one) and ``after_trigger`` says a span only counts if it started no earlier than
    the trigger (``span.start_ns >= trigger.start_ns``: a child started in the same instant
    as its parent counts).
    """

    span: str
    service: str | None = None
    status: SpanStatus | None = None
    where: tuple[Condition, ...] = ()
    count: Bounds | None = None
    after_trigger: bool = False
    duration: DurationBounds | None = None
    _span_glob: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _service_glob: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Frozen dataclass: the compiled forms are derived state, set once here.
        object.__setattr__(self, "_span_glob", compile_glob(self.span))
        glob = compile_glob(self.service) if self.service is not None else None
        object.__setattr__(self, "_service_glob", glob)

    def matches_name(self, name: str) -> bool:
        """Whether a span called ``name`` could match: the span-name pattern only."""
        return _glob_matches(self.span, self._span_glob, name)

    def matches_service(self, service: str) -> bool:
        """Whether a span of ``service`` could match: the service pattern only (True if none)."""
        return self.service is None or _glob_matches(self.service, self._service_glob, service)

    def matches(self, span: Span) -> bool:
        """Whether ``span`` matches every part: name, service, status, each ``where`` and its
        duration (``end_ns - start_ns``)."""
        return (
            self.matches_name(span.name)
            and self.matches_service(span.service)
            and (self.status is None or span.status is self.status)
            and (self.duration is None or self.duration.admits_ns(span.end_ns - span.start_ns))
            and all(condition.holds(span) for condition in self.where)
        )


@dataclass(frozen=True)
class Rule:
    """A loaded rule. ``within`` is the deadline counted from the trigger span's start.

    ``source`` is the file the rule came from and ``line`` the (1-based) line of its list item.

    - ``forbid``: a span in the trace matching one of these fails the run at once.
    - ``correlate``: attribute keys; outcomes may also come from other traces whose spans carry
      the trigger's values of all these keys (and from spans linked to the trigger). A rule
      with ``correlate`` always has ``within``.
    - ``max_duration``: the longest time from the trigger's start to the end of the last
      expected outcome.
    - ``schedule``: when the trigger is due (see ``Schedule``); the trigger proves the start.
    - ``group_by``: attribute keys of the trigger; one open incident per distinct value set.
    - ``open_after`` / ``resolve_after``: flap control, in consecutive failed / passed runs.
    - ``reopen_within``: a failure this soon after a resolve re-opens that incident (None: the
      server's default).
    """

    name: str
    description: str
    owner: str
    route: str
    severity: Severity
    trigger: Selector
    expect: tuple[Selector, ...]
    within: timedelta | None
    evidence: tuple[str, ...]
    source: str
    line: int
    forbid: tuple[Selector, ...] = ()
    correlate: tuple[str, ...] = ()
    max_duration: timedelta | None = None
    schedule: Schedule | None = None
    group_by: tuple[str, ...] = ()
    open_after: int = 1
    resolve_after: int | None = None
    reopen_within: timedelta | None = None


@dataclass(frozen=True)
class RuleSet:
    """Every loaded rule, in file order then list order; names are unique."""

    rules: tuple[Rule, ...]
    _by_name: dict[str, Rule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {rule.name: rule for rule in self.rules})

    def by_name(self, name: str) -> Rule | None:
        """The rule called ``name``, or None."""
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)
