"""The OTLP format boundary: request bytes (protobuf or JSON) -> SpanBatch -> Span.

Decoding is split on purpose. ``batch_from_request`` reads only the scalar fields of every span
(ids, name, times, status, kind) and keeps each span's serialised bytes for storage; attributes
are decoded per span, on demand (``SpanBatch.decode``), only for the few spans a rule or a read
needs. Decoding every attribute of every span in Python would cap ingest near 50k spans/s
(see shared/design/PERFORMANCE.md).

Values are named by representation: ``pb_span`` is a protobuf message, ``span`` a model.Span.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from outcomewatch.errors import InvalidPayload
from outcomewatch.model import AttributeValue, Span, SpanEvent, SpanLink, SpanStatus

_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)


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


def decode_stored_span(raw: bytes, raw_resource: bytes, *, scope: str = "") -> Span:
    """A span as stored (its serialised protobuf and its resource's) as a model.Span."""
    resource = Resource.FromString(raw_resource) if raw_resource else Resource()
    return decode_span(PbSpan.FromString(raw), attributes(resource.attributes), scope=scope)


@dataclass
class SpanBatch:
    """The accepted spans of one export request, column by column.

    Columns hold only what is cheap to read for every span. ``raw`` is each span's own protobuf
    bytes (attributes, events, links inside) and ``raw_resource`` its resource's; both are what
    the store keeps. ``decode(i)`` builds the full model.Span of span ``i`` on demand.
    """

    received_ns: int
    trace_id: list[str] = field(default_factory=list)
    span_id: list[str] = field(default_factory=list)
    parent_span_id: list[str] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    service: list[str] = field(default_factory=list)
    scope: list[str] = field(default_factory=list)
    kind: list[int] = field(default_factory=list)
    start_ns: list[int] = field(default_factory=list)
    end_ns: list[int] = field(default_factory=list)
    status_code: list[int] = field(default_factory=list)
    status_message: list[str] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    raw_resource: list[bytes] = field(default_factory=list)
    rejected: int = 0
    problems: list[str] = field(default_factory=list)
    _pb_spans: list[PbSpan] = field(default_factory=list, repr=False)
    _resource_of: list[int] = field(default_factory=list, repr=False)
    _resources: list[dict[str, AttributeValue]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.span_id)

    def decode(self, i: int) -> Span:
        return decode_span(self._pb_spans[i], self._resources[self._resource_of[i]],
                           scope=self.scope[i])

    def resource(self, i: int) -> dict[str, AttributeValue]:
        return self._resources[self._resource_of[i]]

    @property
    def rejection_message(self) -> str:
        """What OTLP partial success reports: the first few problems, and how many in all."""
        if not self.problems:
            return ""
        shown = "; ".join(self.problems[:5])
        more = len(self.problems) - 5
        return shown + (f"; and {more} more" if more > 0 else "")


def _id_problem(pb_span: PbSpan) -> str | None:
    if len(pb_span.trace_id) != 16:
        return f"trace_id must be 16 bytes, got {len(pb_span.trace_id)}"
    if pb_span.trace_id == _ZERO_TRACE:
        return "trace_id must not be all zeros"
    if len(pb_span.span_id) != 8:
        return f"span_id must be 8 bytes, got {len(pb_span.span_id)}"
    if pb_span.span_id == _ZERO_SPAN:
        return "span_id must not be all zeros"
    if len(pb_span.parent_span_id) not in (0, 8):
        return f"parent_span_id must be empty or 8 bytes, got {len(pb_span.parent_span_id)}"
    return None


def batch_from_request(request: ExportTraceServiceRequest, *, received_ns: int) -> SpanBatch:
    """Validate ids and read the scalar columns of every span of ``request``.

    Spans with ids of the wrong length are rejected one by one (counted in ``rejected``, named
    in ``problems``), as OTLP partial success expects; the rest are accepted.
    """
    batch = SpanBatch(received_ns=received_ns)
    # Local aliases: this loop runs once per received span.
    append_trace, append_span = batch.trace_id.append, batch.span_id.append
    append_parent, append_name = batch.parent_span_id.append, batch.name.append
    append_service, append_scope = batch.service.append, batch.scope.append
    append_kind, append_start = batch.kind.append, batch.start_ns.append
    append_end, append_code = batch.end_ns.append, batch.status_code.append
    append_message, append_raw = batch.status_message.append, batch.raw.append
    append_raw_resource, append_pb = batch.raw_resource.append, batch._pb_spans.append
    append_resource_of = batch._resource_of.append
    for r, pb_resource_spans in enumerate(request.resource_spans):
        resource = attributes(pb_resource_spans.resource.attributes)
        service_value = resource.get("service.name")
        service = service_value if isinstance(service_value, str) else ""
        raw_resource = pb_resource_spans.resource.SerializeToString()
        resource_index = len(batch._resources)
        batch._resources.append(resource)
        for s, pb_scope_spans in enumerate(pb_resource_spans.scope_spans):
            scope = pb_scope_spans.scope.name
            for i, pb_span in enumerate(pb_scope_spans.spans):
                trace_id, span_id = pb_span.trace_id, pb_span.span_id
                if len(trace_id) != 16 or len(span_id) != 8 or trace_id == _ZERO_TRACE or (
                    span_id == _ZERO_SPAN or len(pb_span.parent_span_id) not in (0, 8)
                ):
                    batch.rejected += 1
                    batch.problems.append(
                        f"resource_spans[{r}].scope_spans[{s}].spans[{i}]: {_id_problem(pb_span)}"
                    )
                    continue
                status = pb_span.status
                append_trace(trace_id.hex())
                append_span(span_id.hex())
                append_parent(pb_span.parent_span_id.hex())
                append_name(pb_span.name)
                append_service(service)
                append_scope(scope)
                append_kind(pb_span.kind)
                append_start(pb_span.start_time_unix_nano)
                append_end(pb_span.end_time_unix_nano)
                append_code(status.code)
                append_message(status.message)
                append_raw(pb_span.SerializeToString())
                append_raw_resource(raw_resource)
                append_pb(pb_span)
                append_resource_of(resource_index)
    return batch


def parse_protobuf(body: bytes) -> ExportTraceServiceRequest:
    """Binary OTLP; raise InvalidPayload for bytes that are not an ExportTraceServiceRequest."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidPayload(f"invalid protobuf ExportTraceServiceRequest: {exc}") from exc
    return request


# OTLP/JSON differs from the canonical protobuf JSON mapping in one way that matters: trace and
# span ids are hex, not base64. These are the fields that carry them.
_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(obj: dict[str, Any], where: str) -> None:
    for key in _ID_FIELDS:
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidPayload(f"{where}.{key}: must be a hex string, got {type(value).__name__}")
        try:
            obj[key] = base64.b64encode(bytes.fromhex(value)).decode("ascii")
        except ValueError as exc:
            raise InvalidPayload(f"{where}.{key}: {value!r} is not hex") from exc


def _list(obj: dict[str, Any], *keys: str) -> Sequence[Any]:
    for key in keys:
        value = obj.get(key)
        if value is not None:
            if not isinstance(value, list):
                raise InvalidPayload(f"{key}: must be a list, got {type(value).__name__}")
            return value
    return ()


def parse_json(body: bytes) -> ExportTraceServiceRequest:
    """OTLP/JSON (hex ids, lowerCamelCase or snake_case keys; unknown fields ignored, as the
    OTLP spec asks of receivers); raise InvalidPayload naming the offending field."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidPayload(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        # A body like b"[" * 100_000 is cheap to send; it must be a 400, not a crash.
        raise InvalidPayload("invalid JSON: nested too deeply") from exc
    if not isinstance(document, dict):
        raise InvalidPayload("invalid OTLP/JSON: the body must be a JSON object")
    for r, resource_spans in enumerate(_list(document, "resourceSpans", "resource_spans")):
        if not isinstance(resource_spans, dict):
            raise InvalidPayload(f"resourceSpans[{r}]: must be an object")
        for s, scope_spans in enumerate(_list(resource_spans, "scopeSpans", "scope_spans")):
            if not isinstance(scope_spans, dict):
                raise InvalidPayload(f"resourceSpans[{r}].scopeSpans[{s}]: must be an object")
            for i, span in enumerate(_list(scope_spans, "spans")):
                where = f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]"
                if not isinstance(span, dict):
                    raise InvalidPayload(f"{where}: must be an object")
                _hex_ids_to_base64(span, where)
                for k, link in enumerate(_list(span, "links")):
                    if not isinstance(link, dict):
                        raise InvalidPayload(f"{where}.links[{k}]: must be an object")
                    _hex_ids_to_base64(link, f"{where}.links[{k}]")
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidPayload(f"invalid OTLP/JSON: {exc}") from exc
    return request
