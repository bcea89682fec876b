"""Write the seed corpus of the OTLP decoders to tests/corpus/otlp/ (run from the repo root):

    .venv/bin/python -m tests.fuzz.make_otlp_corpus

The file name says what the decoders must make of the file (tests/test_otlp_fuzz.py checks it):
``valid-*`` decodes with no span rejected, ``partial-*`` decodes with some spans rejected
(under the default limits), ``invalid-*`` is refused whole (InvalidPayload). ``.bin`` files are
binary OTLP (ExportTraceServiceRequest), ``.json`` files OTLP/JSON. Hypothesis and atheris start
from these files; add one whenever a bug is found, with the input that showed it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.spans import TRACE_ID, nested_value

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "otlp"


def _span(n: int, name: str, *, kind: Span.SpanKind.ValueType = Span.SPAN_KIND_UNSPECIFIED,
          parent_span_id: bytes = b"") -> Span:
    span = Span(trace_id=TRACE_ID, span_id=(n + 1).to_bytes(8, "big"), name=name, kind=kind,
                parent_span_id=parent_span_id)
    span.start_time_unix_nano = 1_700_000_000_000_000_000 + n
    span.end_time_unix_nano = span.start_time_unix_nano + 1_000_000
    return span


def _rich_request() -> ExportTraceServiceRequest:
    """Every kind of value, events, links, two resources and scopes."""
    request = ExportTraceServiceRequest()
    for service in ("checkout", "email"):
        resource_spans = request.resource_spans.add()
        resource_spans.resource.attributes.add(key="service.name").value.string_value = service
        resource_spans.resource.attributes.add(key="host.tags").value.CopyFrom(nested_value(1))
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.name = f"{service}.tracer"
        root = _span(0, "POST /orders", kind=Span.SPAN_KIND_SERVER)
        root.status.code = root.status.STATUS_CODE_OK
        for key, value in [
            ("http.route", AnyValue(string_value="/orders")), ("retries", AnyValue(int_value=-3)),
            ("ok", AnyValue(bool_value=True)), ("ratio", AnyValue(double_value=0.25)),
            ("blob", AnyValue(bytes_value=b"\x00\xff")), ("tags", nested_value(2)),
            ("map", nested_value(3, kvlist=True)), ("unset", AnyValue()),
        ]:
            root.attributes.add(key=key).value.CopyFrom(value)
        event = root.events.add(name="exception", time_unix_nano=5)
        event.attributes.add(key="exception.message").value.string_value = "card declined ✗"
        link = root.links.add(trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)))
        link.attributes.add(key="why").value.string_value = "batch"
        child = _span(1, "charge", parent_span_id=root.span_id, kind=Span.SPAN_KIND_CLIENT)
        child.status.code, child.status.message = child.status.STATUS_CODE_ERROR, "declined"
        scope_spans.spans.extend([root, child])
    return request


def _over_the_limits() -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    spans.append(_span(0, "good"))
    crowded = _span(1, "crowded")
    for k in range(200):
        crowded.attributes.add(key=f"a{k}").value.int_value = k
    deep = _span(2, "deep")
    deep.attributes.add(key="deep").value.CopyFrom(nested_value(9, kvlist=True))
    huge = _span(3, "huge")
    huge.events.add(name="log").attributes.add(key="body").value.string_value = "x" * 70_000
    spans.extend([crowded, deep, huge, Span(name="short id", trace_id=TRACE_ID, span_id=b"\x01")])
    return request


def _too_deep_to_parse() -> bytes:
    request = ExportTraceServiceRequest()
    value = request.resource_spans.add().scope_spans.add().spans.add().attributes.add().value
    for _ in range(60):
        value = value.array_value.values.add()
    return request.SerializeToString()


def _odd_enums() -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    span = _span(0, "odd", kind=cast("Span.SpanKind.ValueType", 99))
    span.status.code = 7  # type: ignore[assignment]
    request.resource_spans.add().scope_spans.add().spans.append(span)
    return request


OTLP_JSON = {
    "resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "cart"}}]},
        "scopeSpans": [{"scope": {"name": "cart.tracer"}, "spans": [{
            "traceId": "5B8EFFF798038103D269B633813FC60C", "spanId": "EEE19B7EC3C1B174",
            "parentSpanId": "EEE19B7EC3C1B173", "name": "add item", "kind": 2,
            "startTimeUnixNano": "1544712660000000000", "endTimeUnixNano": 1544712661000000000,
            "attributes": [
                {"key": "qty", "value": {"intValue": "2"}},
                {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}]}}},
                {"key": "blob", "value": {"bytesValue": "AP8="}},
                {"key": "ratio", "value": {"doubleValue": "NaN"}},
            ],
            "events": [{"timeUnixNano": "1544712660300000000", "name": "ev",
                        "attributes": [{"key": "k", "value": {"boolValue": True}}]}],
            "status": {"code": "STATUS_CODE_ERROR", "message": "sold out"},
        }]}],
    }]
}


def corpus() -> dict[str, bytes]:
    rich = _rich_request().SerializeToString()
    utf8 = ExportTraceServiceRequest()
    utf8.resource_spans.add().scope_spans.add().spans.append(_span(0, "caf_"))
    json_text = json.dumps(OTLP_JSON, ensure_ascii=False, indent=1)
    partial = json.loads(json_text)
    partial["resourceSpans"][0]["scopeSpans"][0]["spans"].append(
        {"traceId": "00" * 16, "spanId": "01" * 8, "name": "zero trace id"})
    wrong = json.loads(json_text)
    wrong["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"][0]["value"] = "2"
    return {
        "valid-rich.bin": rich,
        "valid-empty.bin": b"",
        "partial-unknown-enums.bin": _odd_enums().SerializeToString(),
        "partial-over-the-limits.bin": _over_the_limits().SerializeToString(),
        "invalid-truncated.bin": rich[: len(rich) // 2],
        "invalid-utf8.bin": utf8.SerializeToString().replace(b"caf_", b"caf\xc3"),
        "invalid-too-deep.bin": _too_deep_to_parse(),
        "valid-otlp.json": json_text.encode(),
        "valid-empty.json": b"{}",
        "partial-zero-trace-id.json": json.dumps(partial).encode(),
        "invalid-wrong-types.json": json.dumps(wrong).encode(),
        "invalid-truncated.json": json_text.encode()[:200],
        "invalid-utf8.json": json_text.encode().replace(b"cart", b"c\xffrt"),
        "invalid-not-an-object.json": b"[1, 2]",
    }


def main() -> None:
    CORPUS.mkdir(parents=True, exist_ok=True)
    for name, data in corpus().items():
        (CORPUS / name).write_bytes(data)
        print(f"{len(data):8d}  {CORPUS / name}")


if __name__ == "__main__":
    main()
