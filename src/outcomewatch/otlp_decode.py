"""Decoding OTLP protobuf into model values: attribute values, a span, a stored span (its
serialised bytes and its resource's), and the stable id of a serialised resource. What
``otlp.SpanBatch.decode`` and the readers of stored spans build a model.Span with."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from outcomewatch.model import AttributeValue, Span, SpanEvent, SpanLink, SpanStatus


def any_value(pb_value: AnyValue) -> AttributeValue:
    """An OTLP AnyValue as plain Python (bytes become base64 text, as in OTLP/JSON)."""
    kind = pb_value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in pb_value.array_value.values]
    if kind == "kvlist_value":
        return attributes(pb_value.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(pb_value.bytes_value).decode("ascii")
    value: AttributeValue = getattr(pb_value, kind)
    return value


def attributes(pb_attributes: Iterable[KeyValue]) -> dict[str, AttributeValue]:
    return {kv.key: any_value(kv.value) for kv in pb_attributes}


def decode_span(
    pb_span: PbSpan, resource: dict[str, AttributeValue], *, scope: str = ""
) -> Span:
    """A protobuf span (with its decoded resource attributes) as a model.Span."""
    service = resource.get("service.name")
    return Span(
        trace_id=pb_span.trace_id.hex(),
        span_id=pb_span.span_id.hex(),
        parent_span_id=pb_span.parent_span_id.hex(),
        name=pb_span.name,
        service=service if isinstance(service, str) else "",
        kind=pb_span.kind,
        start_ns=pb_span.start_time_unix_nano,
        end_ns=pb_span.end_time_unix_nano,
        status=SpanStatus.from_code(pb_span.status.code),
        status_message=pb_span.status.message,
        attributes=attributes(pb_span.attributes),
        resource=resource,
        events=tuple(
            SpanEvent(e.name, e.time_unix_nano, attributes(e.attributes)) for e in pb_span.events
        ),
        links=tuple(
            SpanLink(link.trace_id.hex(), link.span_id.hex(), attributes(link.attributes))
            for link in pb_span.links
        ),
        scope=scope,
    )


def resource_attributes(raw_resource: bytes) -> dict[str, AttributeValue]:
    """The attributes of a serialised Resource (b"": an empty one)."""
    resource = Resource.FromString(raw_resource) if raw_resource else Resource()
    return attributes(resource.attributes)


def decode_stored_span(raw: bytes, raw_resource: bytes, *, scope: str = "") -> Span:
    """A span as stored (its serialised protobuf and its resource's) as a model.Span."""
    return decode_span(PbSpan.FromString(raw), resource_attributes(raw_resource), scope=scope)


def resource_id(raw_resource: bytes) -> int:
    """A stable 63-bit id for a serialised resource (the same bytes, the same id, any process)."""
    return int.from_bytes(hashlib.blake2b(raw_resource, digest_size=8).digest(), "big") >> 1
