"""What one span may hold (SpanLimits), and why a span or a resource is rejected.

The checks here are the slow, exact ones, run only for a span or resource that a cheap check in
``otlp.batch_from_request`` (lengths, counts, maxima) says may be over a limit; their messages
name the offending field (``attributes['k'][2]: value of 70000 bytes, limit 65536``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from outcomewatch.otlp_probe import probe

ZERO_TRACE = bytes(16)
ZERO_SPAN = bytes(8)
KiB = 1024
# What the span columns hold (store/schema.py: BIGINT times, TINYINT kind and status code) and
# the engine reads as datetimes; OTLP sends fixed64 times and int32 enums: checked per span.
MAX_TIME_NS = 2**63 - 1  # 2262-04-11T23:47:16Z
SPAN_KIND_MAX = 5  # SPAN_KIND_CONSUMER; OTLP defines 0 to 5
STATUS_CODE_MAX = 2  # STATUS_CODE_ERROR; OTLP defines 0 to 2


@dataclass(frozen=True, kw_only=True)
class SpanLimits:
    """What one span may hold. A span over any limit is rejected on its own (OTLP partial
    success), the rest of its request accepted.

    ``max_attribute_value_bytes`` bounds every string and bytes value (strings in UTF-8), and
    every key, anywhere in the attributes of the span, its events, its links and its resource,
    arrays and kvlists included. ``max_value_depth`` bounds AnyValue nesting: each array or
    kvlist is one level, so ``[1]`` is 1 deep and ``[[1]]`` 2. ``max_attributes_per_span`` also
    bounds the resource's attributes (a resource over a limit rejects all its spans); the
    attributes of events and links are not counted (only their sizes and depths are bounded).
    """

    max_attributes_per_span: int = 128
    max_attribute_value_bytes: int = 64 * KiB
    max_value_depth: int = 8
    max_events_per_span: int = 128
    max_links_per_span: int = 128

    def __post_init__(self) -> None:
        # Fail fast: a zero or negative limit would refuse every request, silently. Covers the
        # fields of subclasses too (receiver.Limits).
        for limit in fields(self):
            value = getattr(self, limit.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"{type(self).__name__}.{limit.name} must be a positive int, got {value!r}"
                )


DEFAULT_LIMITS = SpanLimits()




def _id_problem(pb_span: PbSpan) -> str | None:
    if len(pb_span.trace_id) != 16:
        return f"trace_id must be 16 bytes, got {len(pb_span.trace_id)}"
    if pb_span.trace_id == ZERO_TRACE:
        return "trace_id must not be all zeros"
    if len(pb_span.span_id) != 8:
        return f"span_id must be 8 bytes, got {len(pb_span.span_id)}"
    if pb_span.span_id == ZERO_SPAN:
        return "span_id must not be all zeros"
    if len(pb_span.parent_span_id) not in (0, 8):
        return f"parent_span_id must be empty or 8 bytes, got {len(pb_span.parent_span_id)}"
    return None


def _quote(key: str) -> str:
    return repr(key if len(key) <= 40 else key[:40] + "...")


def _size_problem(what: str, size: int, limits: SpanLimits) -> str | None:
    if size > limits.max_attribute_value_bytes:
        return f": {what} of {size} bytes, limit {limits.max_attribute_value_bytes}"
    return None


def _attributes_problem(
    pb_attributes: Iterable[KeyValue], limits: SpanLimits, depth: int = 0
) -> str | None:
    """The first key or value over a limit, as a path suffix and a reason, e.g.
    ``['a'][2]: value of 70000 bytes, limit 65536``; None if all are within the limits."""
    for kv in pb_attributes:
        problem = _size_problem("key", len(kv.key.encode()), limits) or _value_problem(
            kv.value, limits, depth
        )
        if problem is not None:
            return f"[{_quote(kv.key)}]{problem}"
    return None


def _value_problem(pb_value: AnyValue, limits: SpanLimits, depth: int) -> str | None:
    kind = pb_value.WhichOneof("value")
    if kind == "string_value":
        return _size_problem("value", len(pb_value.string_value.encode()), limits)
    if kind == "bytes_value":
        return _size_problem("value", len(pb_value.bytes_value), limits)
    if kind not in ("array_value", "kvlist_value"):
        return None
    if depth >= limits.max_value_depth:
        return f": value nested deeper than {limits.max_value_depth} levels (the limit)"
    if kind == "kvlist_value":
        return _attributes_problem(pb_value.kvlist_value.values, limits, depth + 1)
    for k, pb_item in enumerate(pb_value.array_value.values):
        problem = _value_problem(pb_item, limits, depth + 1)
        if problem is not None:
            return f"[{k}]{problem}"
    return None


def _scalar_problem(pb_span: PbSpan) -> str | None:
    """A time, kind or status code outside what OTLP defines or the span columns hold."""
    for what, ns in (("start_time_unix_nano", pb_span.start_time_unix_nano),
                     ("end_time_unix_nano", pb_span.end_time_unix_nano)):
        if ns > MAX_TIME_NS:
            return f"{what} {ns} is past 2^63-1 ns (2262-04-11), the latest time accepted"
    kind, code = pb_span.kind, pb_span.status.code
    if not 0 <= kind <= SPAN_KIND_MAX:
        return f"kind {kind} is not an OTLP SpanKind (0 to {SPAN_KIND_MAX})"
    return None if 0 <= code <= STATUS_CODE_MAX else (
        f"status.code {code} is not an OTLP StatusCode (0 to {STATUS_CODE_MAX})")


def span_problem(pb_span: PbSpan, limits: SpanLimits) -> str | None:
    """Why ``pb_span`` is rejected, or None. Slow: walks every value."""
    problem = _id_problem(pb_span) or _scalar_problem(pb_span)
    if problem is not None:
        return problem
    for what, count, limit in (
        ("attributes", len(pb_span.attributes), limits.max_attributes_per_span),
        ("events", len(pb_span.events), limits.max_events_per_span),
        ("links", len(pb_span.links), limits.max_links_per_span),
    ):
        if count > limit:
            return f"{count} {what}, limit {limit}"
    located = [("attributes", pb_span.attributes)]
    located += [(f"events[{k}].attributes", e.attributes) for k, e in enumerate(pb_span.events)]
    located += [(f"links[{k}].attributes", x.attributes) for k, x in enumerate(pb_span.links)]
    for where, pb_attributes in located:
        problem = _attributes_problem(pb_attributes, limits)
        if problem is not None:
            return where + problem
    return None


def resource_problem(pb_resource: Resource, raw: bytes, limits: SpanLimits) -> str | None:
    count = len(pb_resource.attributes)
    if count > limits.max_attributes_per_span:
        return f"{count} attributes, limit {limits.max_attributes_per_span}"
    if (len(raw) > limits.max_attribute_value_bytes
            or probe(raw, limits.max_value_depth, resource=True) is None):
        problem = _attributes_problem(pb_resource.attributes, limits)
        if problem is not None:
            return "attributes" + problem
    return None
