"""Response bodies of the HTTP API. Field names are a pinned public contract: rename nothing.

Spans are in schemas_trace.py; notifications, probes and action bodies in schemas_ops.py.

Each model has a ``from_*`` constructor from the store's row types, so routes stay one-liners
and the store never imports the API. Datetimes are aware UTC and serialise as ISO 8601 ``Z``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field, JsonValue

from outcomewatch.model import IncidentStatus, RunStatus, Severity
from outcomewatch.store.rows import (
    FailureRow,
    IncidentDetail,
    IncidentRow,
    Page,
    RunRow,
    TimelineEvent,
)

_NEXT_CURSOR_HELP = "Pass as `cursor` to get the next page; null on the last page."


class ErrorOut(BaseModel):
    detail: str


class AtRiskSpanOut(BaseModel):
    name: str
    status_message: str


class RunOut(BaseModel):
    id: str
    rule: str
    trace_id: str
    status: RunStatus
    opened_at: datetime
    closed_at: datetime | None
    reason: str | None
    missing: list[str]
    late_outcomes: list[str] = Field(
        description="Expected outcomes that arrived after the run had failed; it stays failed.")
    late_at: datetime | None = Field(description="When the latest late outcome arrived.")
    incident_id: int | None = Field(description="The incident a failed run is counted in.")
    due_at: datetime | None = Field(
        default=None,
        description="When an open run will be judged (its deadline, or its trace's idle "
                    "horizon); null for a closed run or when not yet known.")
    at_risk: list[AtRiskSpanOut] = Field(
        default_factory=list,
        description="Spans that matched an expectation's span/service but not its other "
                    "conditions (e.g. an error status): the outcome is at risk.")

    @classmethod
    def from_row(cls, row: RunRow) -> RunOut:
        return cls(
            id=row.id, rule=row.rule, trace_id=row.trace_id, status=row.status,
            opened_at=row.opened_at, closed_at=row.closed_at, reason=row.reason,
            missing=list(row.missing), late_outcomes=list(row.late_outcomes),
            late_at=row.late_at, incident_id=row.incident_id, due_at=row.due_at,
            at_risk=[AtRiskSpanOut(name=s.name, status_message=s.status_message)
                     for s in row.at_risk],
        )


class RunsPage(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None = Field(description=_NEXT_CURSOR_HELP)

    @classmethod
    def from_page(cls, page: Page[RunRow]) -> RunsPage:
        return cls(runs=[RunOut.from_row(r) for r in page.items], next_cursor=page.next_cursor)


class IncidentOut(BaseModel):
    id: int
    rule: str
    status: IncidentStatus
    severity: Severity
    owner: str
    route: str
    opened_at: datetime
    last_failure_at: datetime
    failure_count: int
    summary: str
    group: dict[str, JsonValue] = Field(
        description="The rule's group_by values of this incident; {} for an ungrouped rule.")
    acknowledged_at: datetime | None
    resolved_at: datetime | None

    @staticmethod
    def fields_of(row: IncidentRow) -> dict[str, Any]:
        return {
            "id": row.id, "rule": row.rule, "status": row.status, "severity": row.severity,
            "owner": row.owner, "route": row.route, "opened_at": row.opened_at,
            "last_failure_at": row.last_failure_at, "failure_count": row.failure_count,
            "summary": row.summary, "group": dict(row.group),
            "acknowledged_at": row.acknowledged_at, "resolved_at": row.resolved_at,
        }

    @classmethod
    def from_row(cls, row: IncidentRow) -> IncidentOut:
        return cls(**IncidentOut.fields_of(row))


class IncidentsPage(BaseModel):
    incidents: list[IncidentOut]
    next_cursor: str | None = Field(description=_NEXT_CURSOR_HELP)

    @classmethod
    def from_page(cls, page: Page[IncidentRow]) -> IncidentsPage:
        return cls(
            incidents=[IncidentOut.from_row(r) for r in page.items], next_cursor=page.next_cursor
        )


# The failure detail is JSON written by another component and may predate or postdate this
# code, so it is read leniently: a missing or mistyped key becomes its empty value, never a 500.

def _str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def _dict(obj: Mapping[str, Any], key: str) -> dict[str, JsonValue]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _dicts(obj: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = obj.get(key)
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


class ExceptionOut(BaseModel):
    type: str
    message: str
    stacktrace: str


def _number(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    # bool is an int subclass; true is not a number of milliseconds.
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return float(value)


class SpanSummaryOut(BaseModel):
    """A span of the failed trace, as the incident file shows it."""

    name: str
    service: str
    span_id: str
    kind: str
    status: str
    status_message: str
    duration_ms: float | None

    @classmethod
    def fields_of(cls, obj: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "name": _str(obj, "name"), "service": _str(obj, "service"),
            "span_id": _str(obj, "span_id"), "kind": _str(obj, "kind"),
            "status": _str(obj, "status"), "status_message": _str(obj, "status_message"),
            "duration_ms": _number(obj, "duration_ms"),
        }

    @classmethod
    def from_detail(cls, obj: Mapping[str, Any]) -> SpanSummaryOut:
        return cls(**cls.fields_of(obj))


def _exceptions(obj: Mapping[str, Any]) -> list[ExceptionOut]:
    return [
        ExceptionOut(
            type=_str(e, "type"), message=_str(e, "message"), stacktrace=_str(e, "stacktrace")
        )
        for e in _dicts(obj, "exceptions")
    ]


def _datetime(obj: Mapping[str, Any], key: str) -> datetime | None:
    """An ISO 8601 string with a zone, as UTC; anything else reads as None."""
    value = obj.get(key)
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    if moment is None or moment.tzinfo is None:
        return None
    return moment.astimezone(UTC)


class ErrorSpanOut(SpanSummaryOut):
    exceptions: list[ExceptionOut]
    attributes: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="The span's attributes (the provider's response, HTTP status and body), at "
                    "most 32, long strings cut at 2,048 characters.")

    @classmethod
    def from_detail(cls, obj: Mapping[str, Any]) -> ErrorSpanOut:
        return cls(**SpanSummaryOut.fields_of(obj), exceptions=_exceptions(obj),
                   attributes=_dict(obj, "attributes"))


class OffendingSpanOut(ErrorSpanOut):
    """A span that failed the run by happening: a forbidden step, or one too many."""

    trace_id: str

    @classmethod
    def from_detail(cls, obj: Mapping[str, Any]) -> OffendingSpanOut:
        return cls(
            **SpanSummaryOut.fields_of(obj), exceptions=_exceptions(obj),
            trace_id=_str(obj, "trace_id"), attributes=_dict(obj, "attributes"),
        )


class FailureOut(BaseModel):
    run_id: str
    trace_id: str
    failed_at: datetime
    reason: str
    missing: list[str]
    error_spans: list[ErrorSpanOut] = Field(
        description="Spans with status ERROR or an exception event, with their messages.")
    green_signals: list[SpanSummaryOut] = Field(
        description="Spans that looked healthy (status OK, HTTP 2xx) though the outcome was not.")
    evidence: dict[str, JsonValue] = Field(description="The rule's `evidence` attribute values.")
    resource: dict[str, JsonValue] = Field(
        description="Resource attributes of the trace: service.version is the deploy, host.name.")
    trigger: dict[str, JsonValue] = Field(
        description="The trigger span and its attributes: the retry context.")
    duration_ms: float | None = Field(description="From the trigger's start to the last span.")
    span_count: int | None = Field(description="Spans stored for the trace when it failed.")
    offending: list[OffendingSpanOut] = Field(
        description="The forbidden or surplus spans that failed the run (forbid and count rules).")
    scheduled_at: datetime | None = Field(
        description="For a scheduled run that never started: when it was due.")
    late_outcomes: list[str] = Field(
        description="Expected outcomes that arrived after the verdict; the failure stands.")
    late_at: datetime | None = Field(description="When the latest late outcome arrived.")

    @classmethod
    def from_row(cls, row: FailureRow) -> FailureOut:
        span_count = _number(row.detail, "span_count")
        return cls(
            run_id=row.run_id, trace_id=row.trace_id, failed_at=row.failed_at,
            reason=row.reason, missing=list(row.missing),
            error_spans=[ErrorSpanOut.from_detail(s) for s in _dicts(row.detail, "error_spans")],
            green_signals=[
                SpanSummaryOut.from_detail(s) for s in _dicts(row.detail, "green_signals")
            ],
            evidence=_dict(row.detail, "evidence"), resource=_dict(row.detail, "resource"),
            trigger=_dict(row.detail, "trigger"),
            duration_ms=_number(row.detail, "duration_ms"),
            span_count=None if span_count is None else int(span_count),
            offending=[OffendingSpanOut.from_detail(s) for s in _dicts(row.detail, "offending")],
            scheduled_at=_datetime(row.detail, "scheduled_at"),
            late_outcomes=list(row.late_outcomes), late_at=row.late_at,
        )


class TimelineEventOut(BaseModel):
    at: datetime
    kind: str = Field(
        description="opened, acknowledged, resolved, reopened, late_outcome, or a later kind.")
    actor: str = Field(description="Who made the change: a person's name, or `outcomewatch`.")
    comment: str | None

    @classmethod
    def from_event(cls, event: TimelineEvent) -> TimelineEventOut:
        return cls(at=event.at, kind=event.kind, actor=event.actor, comment=event.comment)


class IncidentDetailOut(IncidentOut):
    description: str = Field(description="The rule's description: what failing means.")
    timeline: list[TimelineEventOut] = Field(
        description="Every transition and late outcome, oldest first (at most the latest 1000).")
    failures: list[FailureOut] = Field(description="The most recent failures, newest first.")

    @classmethod
    def from_detail(cls, detail: IncidentDetail) -> IncidentDetailOut:
        return cls(
            **IncidentOut.fields_of(detail.incident),
            description=detail.incident.description,
            timeline=[TimelineEventOut.from_event(e) for e in detail.timeline],
            failures=[FailureOut.from_row(f) for f in detail.failures],
        )
