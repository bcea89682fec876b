"""Response bodies of GET /api/v1/traces/{trace_id}: stored spans, decoded. Field names are a
pinned public contract, as in schemas.py."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, Field, JsonValue

from outcomewatch.model import AttributeValue, Span, SpanStatus, span_kind_name

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
    next_cursor: str | None = Field(
        default=None, description="The next page's cursor; null on the last page.")
