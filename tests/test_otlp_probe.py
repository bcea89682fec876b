"""otlp_probe.raw_spans: each span's bytes as they lie in the request, aligned with what
protobuf parses, however the envelope's fields are ordered or extended."""

from __future__ import annotations

from typing import cast

from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from outcomewatch.otlp import batch_from_request, parse_protobuf
from outcomewatch.otlp_probe import raw_spans
from tests.spans import TRACE_ID


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _span(n: int) -> bytes:
    return PbSpan(name=f"s{n}", trace_id=TRACE_ID, span_id=(n + 1).to_bytes(8, "big"),
                  kind=cast("PbSpan.SpanKind.ValueType", n % 6)).SerializeToString()


def test_spans_are_cut_in_order_across_interleaved_and_unknown_fields():
    unknown_varint = _varint(99 << 3) + _varint(7)  # field 99, varint 7
    scope_a = (_len_field(2, _span(0)) + _len_field(3, b"https://schema/1")  # schema_url
               + unknown_varint + _len_field(1, _len_field(1, b"lib"))  # scope after a span
               + _len_field(2, _span(1)))
    scope_b = _len_field(2, _span(2))
    resource_spans = (_len_field(2, scope_a) + _len_field(1, b"") + _len_field(2, scope_b))
    body = _len_field(1, resource_spans) + _len_field(1, _len_field(2, _len_field(2, _span(3))))

    request = parse_protobuf(body)
    assert raw_spans(body) == [[[_span(0), _span(1)], [_span(2)]], [[_span(3)]]]
    batch = batch_from_request(request, received_ns=1, body=body)
    assert batch.name == ["s0", "s1", "s2", "s3"]
    assert batch.raw == [_span(n) for n in range(4)]
    assert batch.scope == ["lib", "lib", "", ""]


def test_the_bytes_are_those_sent_not_a_reserialisation():
    # Field order and an explicitly sent default: protobuf would write neither the same way.
    span = (_len_field(5, b"late-name") + bytes([(1 << 3) | 2, 16]) + TRACE_ID
            + bytes([(2 << 3) | 2, 8]) + bytes(7) + b"\x01" + bytes([6 << 3, 0]))  # kind 0
    body = _len_field(1, _len_field(2, _len_field(2, span)))
    batch = batch_from_request(parse_protobuf(body), received_ns=1, body=body)
    assert batch.raw == [span] and batch.name == ["late-name"]
    assert batch.raw[0] != PbSpan.FromString(span).SerializeToString()


def test_bytes_that_do_not_parse_give_none():
    assert raw_spans(b"\x0a\x05\x12") is None
