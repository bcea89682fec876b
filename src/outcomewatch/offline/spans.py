"""Spans for rule tests, as OTLP protobuf: from a test file's compact span tree, or from an
OTLP/JSON file as the Collector's file exporter writes it (one ExportTraceServiceRequest JSON
object per line, ids in hex).

Every span becomes a ``Planned`` span: its own one-span request and the instant it is delivered
(its end, plus an optional ``delay``), as an SDK's span processor exports each span when it ends.
Ids are derived from the test file, the case and the trace label / span position, so a case
always produces the same run ids.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from outcomewatch.durations import parse_duration
from outcomewatch.errors import DurationError
from outcomewatch.model import SPAN_KINDS, STATUS_CODE, SpanStatus

SCOPE = "outcomewatch.test"
DEFAULT_SERVICE = "test"
DEFAULT_TRACE = "a"
SPAN_KEYS = ("name", "service", "resource", "attributes", "start", "duration", "delay", "status",
             "status_message", "kind", "trace", "children")
_ZERO = re.compile(r"0+(?:ms|s|m|h|d)?")


class SpecError(ValueError):
    """A test file that does not say what it means; the message names where."""


@dataclass(frozen=True, slots=True)
class Planned:
    request: ExportTraceServiceRequest
    deliver_ns: int  # when the span is exported: its end (plus ``delay``)
    depth: int  # children before parents when they end at the same instant
    order: int  # then in the order written
    trace_id: str
    label: str  # the trace label ("" for spans read from OTLP/JSON)


def suggest(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f": did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (allowed: {', '.join(allowed)})"


def check_keys(value: Any, allowed: Sequence[str], where: str, required: Sequence[str] = ()
               ) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise SpecError(f"{where}: {suggest(str(key), allowed)}")
    for key in required:
        if key not in value:
            raise SpecError(f"{where}: {key!r} is required")
    return value


def offset_ns(value: Any, where: str, *, allow_zero: bool = True) -> int:
    """A duration from the test file in nanoseconds; ``0``/``0s`` allowed, ``-`` for before."""
    if value == 0 and not isinstance(value, bool) and allow_zero:
        return 0
    if not isinstance(value, str):
        raise SpecError(f"{where}: expected a duration like 250ms or 10s, got {value!r}")
    text = value.strip()
    sign = -1 if text.startswith("-") else 1
    text = text.removeprefix("-")
    if allow_zero and _ZERO.fullmatch(text):
        return 0
    try:
        delta = parse_duration(text)
    except DurationError as exc:
        raise SpecError(f"{where}: {exc}") from exc
    return sign * (delta.days * 86_400_000_000 + delta.seconds * 1_000_000
                   + delta.microseconds) * 1000


def any_value(value: Any, where: str) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, list):
        result = AnyValue()
        result.array_value.values.extend(any_value(v, where) for v in value)
        return result
    if isinstance(value, dict):
        result = AnyValue()
        result.kvlist_value.values.extend(key_values(value, where))
        return result
    raise SpecError(f"{where}: unsupported attribute value {value!r} "
                    "(use a string, number, bool, list or mapping; quote dates)")


def key_values(mapping: Any, where: str) -> list[KeyValue]:
    if not isinstance(mapping, dict):
        raise SpecError(f"{where}: expected a mapping of attributes, got {mapping!r}")
    return [KeyValue(key=str(k), value=any_value(v, f"{where}.{k}")) for k, v in mapping.items()]


def _id(size: int, *parts: str) -> bytes:
    digest = hashlib.sha256("\0".join(parts).encode()).digest()[:size]
    return digest if any(digest) else b"\x01" * size


class TreeBuilder:
    """Plans the spans of one case's ``spans`` tree (times relative to ``start_ns``)."""

    def __init__(self, file: str, case: str, start_ns: int) -> None:
        self._file, self._case, self._start_ns = file, case, start_ns
        self.planned: list[Planned] = []
        self.labels: dict[str, str] = {}  # trace id -> label

    def add(self, nodes: Any, where: str) -> None:
        if not isinstance(nodes, list):
            raise SpecError(f"{where}: expected a list of spans")
        for i, node in enumerate(nodes):
            self._span(node, f"{where}[{i}]", parent=None, depth=0)

    def _span(self, node: Any, where: str, parent: tuple[bytes, str] | None, depth: int) -> None:
        node = check_keys(node, SPAN_KEYS, where, required=("name",))
        if parent is not None and "trace" in node and str(node["trace"]) != parent[1]:
            raise SpecError(f"{where}: a child span is in its parent's trace; drop 'trace'")
        label = parent[1] if parent is not None else str(node.get("trace", DEFAULT_TRACE))
        trace_id = _id(16, self._file, self._case, "trace", label)
        self.labels[trace_id.hex()] = label
        span_id = _id(8, self._file, self._case, "span", str(len(self.planned)), where)
        start = self._start_ns + offset_ns(node.get("start", 0), f"{where}.start")
        duration = offset_ns(node.get("duration", "1ms"), f"{where}.duration")
        delay = offset_ns(node.get("delay", 0), f"{where}.delay")
        if duration < 0 or delay < 0:
            raise SpecError(f"{where}: duration and delay must not be negative")
        pb_span = PbSpan(
            trace_id=trace_id, span_id=span_id, name=str(node["name"]),
            parent_span_id=parent[0] if parent is not None else b"",
            start_time_unix_nano=start, end_time_unix_nano=start + duration,
            kind=PbSpan.SpanKind.ValueType(_kind(node.get("kind", "internal"), f"{where}.kind")),
        )
        pb_span.attributes.extend(key_values(node.get("attributes", {}), f"{where}.attributes"))
        status = node.get("status")
        if status is not None:
            try:
                code = STATUS_CODE[SpanStatus(str(status))]
            except ValueError:
                raise SpecError(f"{where}.status: expected ok, error or unset, got {status!r}"
                                ) from None
            pb_span.status.CopyFrom(Status(code=Status.StatusCode.ValueType(code),
                                          message=str(node.get("status_message", ""))))
        elif "status_message" in node:
            pb_span.status.message = str(node["status_message"])
        resource = dict(node.get("resource") or {})
        resource.setdefault("service.name", str(node.get("service", DEFAULT_SERVICE)))
        request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
            resource=Resource(attributes=key_values(resource, f"{where}.resource")),
            scope_spans=[ScopeSpans(spans=[pb_span])],
        )])
        request.resource_spans[0].scope_spans[0].scope.name = SCOPE
        self.planned.append(Planned(request, start + duration + delay, depth, len(self.planned),
                                    trace_id.hex(), label))
        children = node.get("children", [])
        if not isinstance(children, list):
            raise SpecError(f"{where}.children: expected a list of spans")
        for i, child in enumerate(children):
            self._span(child, f"{where}.children[{i}]", (span_id, label), depth + 1)


def _kind(value: Any, where: str) -> int:
    if str(value) not in SPAN_KINDS[1:]:
        raise SpecError(f"{where}: expected one of {', '.join(SPAN_KINDS[1:])}, got {value!r}")
    return SPAN_KINDS.index(str(value))


# -- OTLP/JSON files ------------------------------------------------------------------------

_ID_FIELDS = {"traceId": 16, "trace_id": 16, "spanId": 8, "span_id": 8,
              "parentSpanId": 8, "parent_span_id": 8}


def _hex_ids(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A span or link object with its hex ids as base64 (the protobuf JSON mapping)."""
    converted = dict(obj)
    for key in _ID_FIELDS:
        value = converted.get(key)
        if isinstance(value, str) and value:
            try:
                converted[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise SpecError(f"{where}.{key}: not a hex id: {value!r}") from None
    return converted


def _list(obj: Mapping[str, Any], camel: str, snake: str) -> list[Any]:
    value = obj.get(camel, obj.get(snake, []))
    return value if isinstance(value, list) else []


def read_otlp_json(path: Path) -> list[Planned]:
    """Every span of an OTLP/JSON lines file, each in a request of its own, delivered at its end
    time (absolute, as written)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SpecError(f"cannot read OTLP/JSON file {path}: {exc}") from exc
    planned: list[Planned] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            document = json.loads(line)
        except ValueError as exc:
            raise SpecError(f"{where}: invalid JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise SpecError(f"{where}: expected an ExportTraceServiceRequest object")
        for r, resource_spans in enumerate(_list(document, "resourceSpans", "resource_spans")):
            for s, scope_spans in enumerate(_list(resource_spans, "scopeSpans", "scope_spans")):
                for i, span in enumerate(_list(scope_spans, "spans", "spans")):
                    at = f"{where}: resourceSpans[{r}].scopeSpans[{s}].spans[{i}]"
                    span = _hex_ids(span, at)
                    span["links"] = [_hex_ids(link, f"{at}.links")
                                     for link in _list(span, "links", "links")]
                    single = {
                        "resourceSpans": [{
                            "resource": resource_spans.get("resource", {}),
                            "scopeSpans": [{"scope": scope_spans.get("scope", {}),
                                            "spans": [span]}],
                        }],
                    }
                    request = ExportTraceServiceRequest()
                    try:
                        json_format.ParseDict(single, request, ignore_unknown_fields=True)
                    except json_format.ParseError as exc:
                        raise SpecError(f"{at}: {exc}") from exc
                    pb_span = request.resource_spans[0].scope_spans[0].spans[0]
                    planned.append(Planned(request, pb_span.end_time_unix_nano, 0, len(planned),
                                           pb_span.trace_id.hex(), ""))
    return planned


def earliest_start_ns(planned: Sequence[Planned]) -> int | None:
    starts = [span.start_time_unix_nano for p in planned
              for rs in p.request.resource_spans for ss in rs.scope_spans for span in ss.spans]
    return min(starts, default=None)
