"""Value types shared by every part of outcomewatch. No I/O here.

Closed sets are StrEnums so that a status is never a bare string checked by hand; the values are
what the API and the database show.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

AttributeValue = str | bool | int | float | list[Any] | dict[str, Any] | None


class SpanStatus(StrEnum):
    UNSET = "unset"
    OK = "ok"
    ERROR = "error"

    @classmethod
    def from_code(cls, code: int) -> SpanStatus:
        """OTLP Status.code (0 unset, 1 ok, 2 error); unknown codes read as unset."""
        return _STATUS_BY_CODE.get(code, cls.UNSET)


_STATUS_BY_CODE = {0: SpanStatus.UNSET, 1: SpanStatus.OK, 2: SpanStatus.ERROR}
STATUS_CODE = {status: code for code, status in _STATUS_BY_CODE.items()}

SPAN_KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")


def span_kind_name(kind: int) -> str:
    return SPAN_KINDS[kind] if 0 <= kind < len(SPAN_KINDS) else "unspecified"


class RunStatus(StrEnum):
    OPEN = "open"
    PASSED = "passed"
    FAILED = "failed"


class IncidentStatus(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class FailureReason(StrEnum):
    """Why a run failed."""

    TRACE_IDLE = "trace_idle"  # the trace went quiet with an outcome missing
    DEADLINE = "deadline"  # the rule's `within` passed with an outcome missing
    FORBIDDEN = "forbidden"  # a span matching `forbid` was seen
    COUNT = "count"  # an outcome was seen more often than its `count` allows
    MAX_DURATION = "max_duration"  # the outcomes came, but later than `max_duration`
    MISSED = "missed"  # a scheduled run never started (no trigger within `grace`)
    EVICTED = "evicted"  # live state was over its budget; evaluated early with what was seen


@dataclass(frozen=True, slots=True)
class SpanEvent:
    name: str
    time_ns: int
    attributes: Mapping[str, AttributeValue]


@dataclass(frozen=True, slots=True)
class SpanLink:
    trace_id: str
    span_id: str
    attributes: Mapping[str, AttributeValue]


@dataclass(frozen=True, slots=True)
class Span:
    """One span, fully decoded. Ids are lowercase hex (32 chars trace, 16 chars span)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    kind: int
    start_ns: int
    end_ns: int
    status: SpanStatus
    status_message: str
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    resource: Mapping[str, AttributeValue] = field(default_factory=dict)
    events: tuple[SpanEvent, ...] = ()
    links: tuple[SpanLink, ...] = ()
    scope: str = ""

    def lookup(self, key: str) -> AttributeValue:
        """The attribute ``key`` of the span, else of its resource, else None."""
        if key in self.attributes:
            return self.attributes[key]
        return self.resource.get(key)

    def has(self, key: str) -> bool:
        return key in self.attributes or key in self.resource


# What the engine decides, as values: the server persists them, the engine does no I/O.


@dataclass(frozen=True, slots=True)
class RunOpened:
    run_id: str
    rule: str
    trace_id: str
    trigger_span_id: str
    opened_at: datetime
    deadline_at: datetime | None
    # The trigger's scalar attribute values, as (key, text): the search index (customer ids,
    # invoice ids, ...) so that "what happened to customer X?" is one indexed lookup.
    keys: tuple[tuple[str, str], ...] = ()


MAX_SEARCH_KEYS = 32  # per run
MAX_SEARCH_VALUE = 256  # characters; longer values are not searchable ids


def search_keys(attributes: Mapping[str, AttributeValue]) -> tuple[tuple[str, str], ...]:
    """The attribute values worth finding a run by: strings, ints and bools, as text."""
    keys: list[tuple[str, str]] = []
    for key, value in attributes.items():
        # Exact types first (what OTLP decoding gives): called for every trigger, this loop
        # was a tenth of the event loop's time with isinstance against a union.
        text: str
        if type(value) is str:
            text = value
        elif type(value) is int:
            text = str(value)
        elif isinstance(value, bool) or not isinstance(value, str | int):
            continue  # true/false finds nothing in particular
        else:
            text = str(value)
        if text and len(text) <= MAX_SEARCH_VALUE:
            keys.append((key, text))
            if len(keys) >= MAX_SEARCH_KEYS:
                break
    return tuple(keys)


# Values of a rule's group_by keys, in the rule's order; () for an ungrouped rule.
GroupValues = tuple[tuple[str, AttributeValue], ...]


@dataclass(frozen=True, slots=True)
class RunPassed:
    run_id: str
    rule: str
    trace_id: str
    opened_at: datetime
    closed_at: datetime
    group: GroupValues = ()


@dataclass(frozen=True, slots=True)
class RunFailed:
    run_id: str
    rule: str
    trace_id: str
    trigger: Span | None  # None for a scheduled run that never started
    opened_at: datetime
    closed_at: datetime
    reason: FailureReason
    missing: tuple[str, ...]
    first_received_ns: int  # lower bound of the trace's received_ns, to narrow the evidence query
    offending: tuple[Span, ...] = ()  # the forbidden or surplus spans that failed the run
    group: GroupValues = ()
    last_received_ns: int = 0  # upper bound of the trace's received_ns so far (0: unknown)


@dataclass(frozen=True, slots=True)
class LateOutcome:
    """An expected outcome seen after its run had already failed."""

    run_id: str
    rule: str
    trace_id: str
    outcome: str  # the expectation's `span` pattern, as in `missing`
    at: datetime


@dataclass(frozen=True, slots=True)
class RunAtRisk:
    """A span that matched an expectation's span and service but not its other conditions (an
    ``email.delivered`` with status error, a ``mail.receipt`` with ``state: bounced``) while the
    run waits: the outcome may not come. The run still waits for its deadline (a retry may
    succeed) unless a ``forbid`` fails it at once."""

    run_id: str
    rule: str
    trace_id: str
    span: str  # the span's name
    status_message: str  # its status message, else its status
    at: datetime


RunEvent = RunOpened | RunPassed | RunFailed | LateOutcome | RunAtRisk


@dataclass(frozen=True)
class OutboxRow:
    """One notification to deliver: an incident transition for one target of its route."""

    id: int  # increasing; delivery order within an incident follows id
    incident_id: int
    transition: str  # "opened" | "reopened" | "acknowledged" | "resolved"
    target: str  # "alertmanager" | "webhook"
    route: str  # the rule's route: key into the config's routes
    payload: Mapping[str, Any]  # snapshot of the incident at the transition
    attempts: int  # attempts made so far
    created_at: datetime
