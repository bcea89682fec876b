"""Response bodies of the HTTP API. Field names are a pinned public contract: rename nothing.

Each model has a ``from_*`` constructor from the store's row types, so routes stay one-liners
and the store never imports the API. Datetimes are aware UTC and serialise as ISO 8601 ``Z``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field, JsonValue

from outcomewatch.model import (
    AttributeValue,
    IncidentStatus,
    RunStatus,
    Severity,
    Span,
    SpanStatus,
    span_kind_name,
)
from outcomewatch.store.queries import FailureRow, IncidentDetail, IncidentRow, Page, RunRow

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NEXT_CURSOR_HELP = "Pass as `cursor` to get the next page; null on the last page."


class HealthOut(BaseModel):
    status: Literal["ok", "starting"]


class ErrorOut(BaseModel):
    detail: str


class RunOut(BaseModel):
    id: str
    rule: str
    trace_id: str
    status: RunStatus
    opened_at: datetime
    closed_at: datetime | None
    reason: str | None
    missing: list[str]

    @classmethod
    def from_row(cls, row: RunRow) -> RunOut:
        return cls(
            id=row.id, rule=row.rule, trace_id=row.trace_id, status=row.status,
            opened_at=row.opened_at, closed_at=row.closed_at, reason=row.reason,
            missing=list(row.missing),
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

    @staticmethod
    def fields_of(row: IncidentRow) -> dict[str, Any]:
        return {
            "id": row.id, "rule": row.rule, "status": row.status, "severity": row.severity,
            "owner": row.owner, "route": row.route, "opened_at": row.opened_at,
            "last_failure_at": row.last_failure_at, "failure_count": row.failure_count,
            "summary": row.summary,
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


class ErrorSpanOut(SpanSummaryOut):
    exceptions: list[ExceptionOut]

    @classmethod
    def from_detail(cls, obj: Mapping[str, Any]) -> ErrorSpanOut:
        return cls(
            **SpanSummaryOut.fields_of(obj),
            exceptions=[
                ExceptionOut(
                    type=_str(e, "type"), message=_str(e, "message"),
                    stacktrace=_str(e, "stacktrace"),
                )
                for e in _dicts(obj, "exceptions")
            ],
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
        )


class IncidentDetailOut(IncidentOut):
    failures: list[FailureOut] = Field(description="The most recent failures, newest first.")

    @classmethod
    def from_detail(cls, detail: IncidentDetail) -> IncidentDetailOut:
        return cls(
            **IncidentOut.fields_of(detail.incident),
            failures=[FailureOut.from_row(f) for f in detail.failures],
        )


def _json_attributes(attributes: Mapping[str, AttributeValue]) -> dict[str, JsonValue]:
    return dict(attributes)


def _utc_from_ns(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


class SpanEventOut(BaseModel):
    name: str
    time_ns: int
    attributes: dict[str, JsonValue]


class SpanLinkOut(BaseModel):
    trace_id: str
    span_id: str
    attributes: dict[str, JsonValue]


class SpanOut(BaseModel):
    trace_id: str
    span_id: str
    parent_span_id: str = Field(description="Empty for a root span.")
    name: str
    service: str
    kind: str = Field(description="unspecified, internal, server, client, producer or consumer.")
    start_ns: int
    end_ns: int
    start: datetime
    end: datetime
    duration_ms: float
    status: SpanStatus
    status_message: str
    attributes: dict[str, JsonValue]
    resource: dict[str, JsonValue]
    events: list[SpanEventOut]
    links: list[SpanLinkOut]

    @classmethod
    def from_span(cls, span: Span) -> SpanOut:
        return cls(
            trace_id=span.trace_id, span_id=span.span_id, parent_span_id=span.parent_span_id,
            name=span.name, service=span.service, kind=span_kind_name(span.kind),
            start_ns=span.start_ns, end_ns=span.end_ns, start=_utc_from_ns(span.start_ns),
            end=_utc_from_ns(span.end_ns), duration_ms=(span.end_ns - span.start_ns) / 1e6,
            status=span.status, status_message=span.status_message,
            attributes=_json_attributes(span.attributes),
            resource=_json_attributes(span.resource),
            events=[
                SpanEventOut(name=e.name, time_ns=e.time_ns,
                             attributes=_json_attributes(e.attributes))
                for e in span.events
            ],
            links=[
                SpanLinkOut(trace_id=link.trace_id, span_id=link.span_id,
                            attributes=_json_attributes(link.attributes))
                for link in span.links
            ],
        )


class TraceOut(BaseModel):
    trace_id: str
    spans: list[SpanOut] = Field(description="Each span once, ordered by start time.")
