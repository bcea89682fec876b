"""What one span may hold (SpanLimits), and the rest of the "bad input" guarantee at the OTLP
boundary: each span over a limit is rejected alone and named; the rest of its request is kept."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from outcomewatch import otlp, otlp_limits
from outcomewatch.errors import InvalidPayload
from outcomewatch.model import SpanStatus, span_kind_name
from outcomewatch.otlp import batch_from_request, parse_protobuf
from outcomewatch.otlp_limits import SpanLimits
from outcomewatch.receiver import Limits
from tests.spans import TRACE_ID, nested_value

SPAN = "resource_spans[0].scope_spans[0].spans"


def request_of(
    *spans: PbSpan, resource: dict[str, AnyValue] | None = None
) -> ExportTraceServiceRequest:
    """One resource (service "svc" unless ``resource`` is given), one scope, these spans."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    for key, value in (resource or {"service.name": AnyValue(string_value="svc")}).items():
        resource_spans.resource.attributes.add(key=key).value.CopyFrom(value)
    resource_spans.scope_spans.add().spans.extend(spans)
    return request


def span(n: int, **attributes: AnyValue) -> PbSpan:
    """A valid span named span-<n> (span id n+1), with ``attributes``."""
    pb_span = PbSpan(name=f"span-{n}", trace_id=TRACE_ID, span_id=(n + 1).to_bytes(8, "big"))
    for key, value in attributes.items():
        pb_span.attributes.add(key=key).value.CopyFrom(value)
    return pb_span


def text(value: str) -> AnyValue:
    return AnyValue(string_value=value)


def decode(request: ExportTraceServiceRequest, limits: SpanLimits | None = None) -> otlp.SpanBatch:
    """As the receivers do: from the bytes on the wire, the spans' bytes cut from them."""
    body = request.SerializeToString()
    return batch_from_request(
        parse_protobuf(body), received_ns=1, limits=limits or SpanLimits(), body=body
    )


def test_it_rejects_a_span_with_too_many_attributes_and_accepts_the_others():
    crowded = span(1, **{f"a{k}": text("v") for k in range(200)})
    batch = decode(request_of(span(0), crowded, span(2)))
    assert batch.name == ["span-0", "span-2"]
    assert batch.rejected == 1
    assert batch.problems == [f"{SPAN}[1]: 200 attributes, limit 128"]


def test_it_accepts_a_span_with_exactly_the_limit_of_attributes():
    batch = decode(request_of(span(0, **{f"a{k}": text("v") for k in range(128)})))
    assert (len(batch), batch.rejected) == (1, 0)


@pytest.mark.parametrize(("what", "limit_name"), [("events", "max_events_per_span"),
                                                  ("links", "max_links_per_span")])
def test_it_rejects_a_span_with_too_many_events_or_links(what, limit_name):
    over, at_limit = span(1), span(2)
    for pb_span, count in ((over, 5), (at_limit, 4)):
        for _ in range(count):
            getattr(pb_span, what).add()
    batch = decode(request_of(span(0), over, at_limit), SpanLimits(**{limit_name: 4}))
    assert batch.name == ["span-0", "span-2"]
    assert batch.problems == [f"{SPAN}[1]: 5 {what}, limit 4"]


def test_events_are_limited_per_span_not_per_request():
    spans = [span(n) for n in range(10)]
    for pb_span in spans:
        for _ in range(3):
            pb_span.events.add(name="retry")
    batch = decode(request_of(*spans), SpanLimits(max_events_per_span=3))
    assert (len(batch), batch.rejected) == (10, 0)


@pytest.mark.parametrize(
    ("value", "where"),
    [
        (text("é" * 33), ""),  # 33 characters, 66 bytes in UTF-8
        (AnyValue(bytes_value=bytes(65)), ""),
        (nested_value(3, leaf="x" * 65), "[0][0][0]"),
        (nested_value(2, kvlist=True, leaf="x" * 65), "['k']['k']"),
    ],
)
def test_it_rejects_a_span_with_a_value_over_the_size_limit_wherever_it_is(value, where):
    batch = decode(request_of(span(0, big=value), span(1, small=text("x" * 64))),
                   SpanLimits(max_attribute_value_bytes=64))
    assert batch.name == ["span-1"]
    [problem] = batch.problems
    assert problem.startswith(f"{SPAN}[0]: attributes['big']{where}: value of ")
    assert problem.endswith(" bytes, limit 64")


def test_it_rejects_a_key_over_the_size_limit():
    batch = decode(request_of(span(0, **{"k" * 65: text("v")})),
                   SpanLimits(max_attribute_value_bytes=64))
    assert batch.problems == [
        f"{SPAN}[0]: attributes['{'k' * 40}...']: key of 65 bytes, limit 64"
    ]


def test_it_rejects_a_value_over_the_size_limit_in_an_event_or_a_link():
    with_event, with_link = span(0), span(1)
    with_event.events.add(name="e").attributes.add(key="body").value.string_value = "x" * 65
    with_link.links.add(trace_id=TRACE_ID, span_id=bytes([9]) * 8).attributes.add(
        key="why"
    ).value.string_value = "x" * 65
    batch = decode(request_of(with_event, with_link), SpanLimits(max_attribute_value_bytes=64))
    assert batch.problems == [
        f"{SPAN}[0]: events[0].attributes['body']: value of 65 bytes, limit 64",
        f"{SPAN}[1]: links[0].attributes['why']: value of 65 bytes, limit 64",
    ]


def test_a_span_larger_than_the_value_limit_whose_values_are_all_small_is_accepted():
    many = span(0, **{f"a{k}": text("x" * 60) for k in range(100)})
    assert many.ByteSize() > 64 * 60
    batch = decode(request_of(many), SpanLimits(max_attribute_value_bytes=64))
    assert (len(batch), batch.rejected) == (1, 0)


@pytest.mark.parametrize("kvlist", [False, True])
def test_it_accepts_values_nested_to_the_limit_and_rejects_one_level_more(kvlist):
    batch = decode(request_of(span(0, v=nested_value(8, kvlist=kvlist)),
                              span(1, v=nested_value(9, kvlist=kvlist))))
    assert batch.name == ["span-0"]
    [problem] = batch.problems
    assert problem.startswith(f"{SPAN}[1]: attributes['v']")
    assert problem.endswith(": value nested deeper than 8 levels (the limit)")


def test_an_empty_array_counts_as_a_level():
    innermost_empty = AnyValue()
    innermost_empty.array_value.SetInParent()
    for _ in range(2):
        outer = AnyValue()
        outer.array_value.values.append(innermost_empty)
        innermost_empty = outer
    limits = SpanLimits(max_value_depth=2)
    assert decode(request_of(span(0, v=innermost_empty)), limits).rejected == 1
    assert decode(request_of(span(0, v=nested_value(2))), limits).rejected == 0


def test_it_rejects_values_nested_too_deep_in_an_event_or_a_link():
    with_event, with_link = span(0), span(1)
    with_event.events.add().attributes.add(key="e").value.CopyFrom(nested_value(3))
    link = with_link.links.add(trace_id=TRACE_ID, span_id=bytes([9]) * 8)
    link.attributes.add(key="l").value.CopyFrom(nested_value(3, kvlist=True))
    batch = decode(request_of(with_event, with_link, span(2, ok=nested_value(2))),
                   SpanLimits(max_value_depth=2))
    assert batch.name == ["span-2"]
    assert [p.partition(": value")[0] for p in batch.problems] == [
        f"{SPAN}[0]: events[0].attributes['e'][0][0]",
        f"{SPAN}[1]: links[0].attributes['l']['k']['k']",
    ]


@pytest.mark.parametrize("max_depth", [1, 3, 20])
def test_the_depth_limit_holds_for_any_setting(max_depth):
    limits = SpanLimits(max_value_depth=max_depth)
    batch = decode(request_of(span(0, v=nested_value(max_depth)),
                              span(1, v=nested_value(max_depth + 1, kvlist=True))), limits)
    assert (batch.name, batch.rejected) == (["span-0"], 1)


def test_it_rejects_identical_spans_nested_too_deep_each_one():
    deep = span(0, v=nested_value(9))
    batch = decode(request_of(deep, deep, span(1)))
    assert (batch.name, batch.rejected) == (["span-1"], 2)


def test_a_value_nested_deeper_than_protobuf_parses_refuses_the_whole_request():
    assert decode(request_of(span(0, v=nested_value(46)))).rejected == 1
    request = ExportTraceServiceRequest()
    pb_value = request.resource_spans.add().scope_spans.add().spans.add().attributes.add().value
    for _ in range(60):
        pb_value = pb_value.array_value.values.add()
    with pytest.raises(InvalidPayload, match="nested too deeply"):
        parse_protobuf(request.SerializeToString())


def test_a_resource_over_a_limit_rejects_its_spans_and_not_those_of_other_resources():
    request = request_of(span(0), span(1), resource={f"r{k}": text("v") for k in range(130)})
    good = request.resource_spans.add()
    good.resource.attributes.add(key="service.name").value.string_value = "other"
    good.scope_spans.add().spans.append(span(2))
    batch = decode(request)
    assert (batch.name, batch.service, batch.rejected) == (["span-2"], ["other"], 2)
    assert batch.problems == [
        "resource_spans[0].resource: 130 attributes, limit 128 (its 2 spans are rejected)"
    ]


@pytest.mark.parametrize(
    ("value", "reason"),
    [(nested_value(9), "value nested deeper than 8 levels"), (text("x" * 65), "value of 65")],
)
def test_a_resource_value_over_a_limit_rejects_its_spans(value, reason):
    batch = decode(request_of(span(0), resource={"r": value}),
                   SpanLimits(max_attribute_value_bytes=64))
    assert len(batch) == 0
    [problem] = batch.problems
    assert problem.startswith("resource_spans[0].resource: attributes['r']")
    assert reason in problem


def test_after_rejections_every_column_still_describes_the_same_span():
    spans = [span(n, index=AnyValue(int_value=n)) for n in range(6)]
    spans[1].attributes.add(key="deep").value.CopyFrom(nested_value(9))
    spans[3].span_id = b"\x01"
    spans[4].attributes.add(key="deep").value.CopyFrom(nested_value(12, kvlist=True))
    batch = decode(request_of(*spans))
    assert batch.name == ["span-0", "span-2", "span-5"]
    assert batch.rejected == 3
    for i, name in enumerate(batch.name):
        assert PbSpan.FromString(batch.raw[i]).name == name
        assert batch.decode(i).name == name
        assert batch.decode(i).attributes == {"index": int(name[-1])}
        assert batch.span_id[i] == batch.decode(i).span_id


def test_a_request_within_the_limits_decodes_no_attribute_value(monkeypatch):
    def refuse(*args: object) -> None:
        raise AssertionError("an attribute value was decoded")

    monkeypatch.setattr(otlp_limits, "_value_problem", refuse)
    spans = [span(n, **{f"a{k}": nested_value(k % 3) for k in range(10)}) for n in range(50)]
    batch = decode(request_of(*spans))
    assert (len(batch), batch.rejected) == (50, 0)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("kind", 6, "kind 6 is not an OTLP SpanKind (0 to 5)"),
        ("kind", -(2**31), f"kind {-(2**31)} is not an OTLP SpanKind (0 to 5)"),
        ("code", 3, "status.code 3 is not an OTLP StatusCode (0 to 2)"),
        ("code", 2**31 - 1, f"status.code {2**31 - 1} is not an OTLP StatusCode (0 to 2)"),
        ("start_time_unix_nano", 2**63,
         f"start_time_unix_nano {2**63} is past 2^63-1 ns (2262-04-11), the latest time "
         "accepted"),
        ("end_time_unix_nano", 2**64 - 1, f"end_time_unix_nano {2**64 - 1} is past 2^63-1 ns "
         "(2262-04-11), the latest time accepted"),
    ],
)
def test_a_value_that_no_span_column_holds_rejects_that_span_alone(field, value, problem):
    odd, good = span(0), span(1)
    setattr(odd.status if field == "code" else odd, field, value)
    batch = decode(request_of(good, odd))
    assert (batch.rejected, batch.name) == (1, ["span-1"])
    assert batch.rejection_message == f"resource_spans[0].scope_spans[0].spans[1]: {problem}"


def test_the_edges_of_each_span_column_are_accepted_as_sent():
    edge = span(0)
    edge.kind, edge.status.code = PbSpan.SPAN_KIND_CONSUMER, edge.status.STATUS_CODE_ERROR
    edge.start_time_unix_nano = edge.end_time_unix_nano = 2**63 - 1
    edge.flags = edge.dropped_attributes_count = edge.dropped_events_count = 2**32 - 1
    batch = decode(request_of(edge))
    assert (batch.kind, batch.status_code, batch.start_ns, batch.end_ns) == (
        [5], [2], [2**63 - 1], [2**63 - 1])
    assert batch.decode(0).status is SpanStatus.ERROR
    assert span_kind_name(batch.decode(0).kind) == "consumer"


@pytest.mark.parametrize(
    "request_",
    [
        ExportTraceServiceRequest(),
        request_of(),
        ExportTraceServiceRequest(resource_spans=[ResourceSpans()]),
    ],
    ids=["no resource_spans", "no spans", "empty resource_spans"],
)
def test_an_empty_request_is_an_empty_batch(request_):
    batch = decode(request_)
    assert (len(batch), batch.rejected, batch.rejection_message) == (0, 0, "")


def test_a_zero_length_protobuf_body_is_an_empty_request():
    assert parse_protobuf(b"") == ExportTraceServiceRequest()


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, by hand (payloads under 128 bytes)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def _request_with_span(span_bytes: bytes) -> bytes:
    # ExportTraceServiceRequest.resource_spans(1) > ResourceSpans.scope_spans(2) > spans(2)
    return _field(1, _field(2, _field(2, span_bytes)))


@pytest.mark.parametrize(
    "span_bytes",
    [
        _field(5, b"caf\xc3"),  # name: a truncated two-byte sequence
        _field(9, _field(1, b"\xff\xfe")),  # an attribute key
        _field(9, _field(1, b"k") + _field(2, _field(1, b"\xed\xa0\x80"))),  # a surrogate
    ],
    ids=["name", "attribute key", "string value"],
)
def test_invalid_utf8_in_a_string_field_refuses_the_whole_request(span_bytes):
    assert parse_protobuf(_request_with_span(_field(5, b"ok"))).resource_spans[0]
    with pytest.raises(InvalidPayload, match="invalid UTF-8"):
        parse_protobuf(_request_with_span(span_bytes))


def test_invalid_utf8_in_a_bytes_value_is_fine():
    span_bytes = _field(1, TRACE_ID) + _field(2, bytes([1]) * 8)
    span_bytes += _field(9, _field(1, b"k") + _field(2, _field(7, b"\xff\xfe")))
    batch = batch_from_request(parse_protobuf(_request_with_span(span_bytes)), received_ns=1)
    assert batch.decode(0).attributes == {"k": "//4="}


def test_limits_must_be_positive_ints_and_given_by_name():
    with pytest.raises(ValueError, match="max_value_depth must be a positive int"):
        Limits(max_value_depth=0)
    with pytest.raises(ValueError, match="max_attributes_per_span must be a positive int"):
        SpanLimits(max_attributes_per_span=True)
    with pytest.raises(TypeError):
        Limits(1024)  # type: ignore[call-arg]
    assert isinstance(Limits(), SpanLimits)
