"""OTLP/JSON bodies: the protobuf JSON mapping with hex ids; every type error named by its path."""

from __future__ import annotations

import json
from typing import Any

import pytest

from outcomewatch.errors import InvalidPayload
from outcomewatch.receiver.otlp_json import parse_json

TRACE_HEX, SPAN_HEX = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
WHERE = "resourceSpans[0].scopeSpans[0].spans[0]"


def body_with_span(**fields: Any) -> bytes:
    span = {"traceId": TRACE_HEX, "spanId": SPAN_HEX, "name": "pay", **fields}
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}).encode()


def attribute(value: Any) -> dict[str, Any]:
    return {"attributes": [{"key": "a", "value": value}]}


def test_it_reads_hex_ids_camel_or_snake_case_keys_and_ignores_unknown_fields():
    request = parse_json(body_with_span(
        parent_span_id="00f067aa0ba902b7", kind="SPAN_KIND_SERVER", startTimeUnixNano="17",
        endTimeUnixNano=18, futureField={"x": 1}, **attribute({"arrayValue": {"values": [
            {"intValue": "5"}, {"kvlistValue": {"values": [{"key": "b", "value": {}}]}},
        ]}}),
    ))
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert span.trace_id.hex() == TRACE_HEX
    assert span.parent_span_id.hex() == "00f067aa0ba902b7"
    assert (span.kind, span.start_time_unix_nano, span.end_time_unix_nano) == (2, 17, 18)
    assert span.attributes[0].value.array_value.values[0].int_value == 5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"traceId": 7}, f"{WHERE}.traceId: must be a hex string, got int"),
        ({"spanId": "xyz"}, f"{WHERE}.spanId: 'xyz' is not hex"),
        ({"name": 5}, f"{WHERE}.name: must be a string, got int"),
        ({"startTimeUnixNano": "soon"}, f"{WHERE}.startTimeUnixNano: 'soon' is not an integer"),
        ({"endTimeUnixNano": "-1"}, f"{WHERE}.endTimeUnixNano: -1 is out of range"),
        ({"kind": 1.5}, f"{WHERE}.kind: 1.5 is not an integer"),
        ({"kind": True}, f"{WHERE}.kind: must be an integer, got bool"),
        ({"status": "error"}, f"{WHERE}.status: must be an object, got str"),
        ({"status": {"code": [2]}}, f"{WHERE}.status.code: must be an integer, got list"),
        ({"events": {"name": "e"}}, f"{WHERE}.events: must be a list, got dict"),
        ({"events": ["e"]}, f"{WHERE}.events[0]: must be an object, got str"),
        ({"links": [{"traceId": TRACE_HEX, "spanId": 3}]},
         f"{WHERE}.links[0].spanId: must be a hex string, got int"),
        ({"attributes": {"a": 1}}, f"{WHERE}.attributes: must be a list, got dict"),
        (attribute("x"), f"{WHERE}.attributes[0].value: must be an object, got str"),
        (attribute({"intValue": "abc"}),
         f"{WHERE}.attributes[0].value.intValue: 'abc' is not an integer"),
        (attribute({"boolValue": "yes"}),
         f"{WHERE}.attributes[0].value.boolValue: must be true or false, got str"),
        (attribute({"doubleValue": "nan"}),
         f"{WHERE}.attributes[0].value.doubleValue: 'nan' is not a number"),
        (attribute({"bytesValue": "!!"}),
         f"{WHERE}.attributes[0].value.bytesValue: '!!' is not base64"),
        (attribute({"arrayValue": {"values": [{"kvlistValue": {"values": [{"key": 1}]}}]}}),
         f"{WHERE}.attributes[0].value.arrayValue.values[0].kvlistValue.values[0].key: "
         "must be a string, got int"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_with_its_path(fields, message):
    with pytest.raises(InvalidPayload) as refused:
        parse_json(body_with_span(**fields))
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"resourceSpans": {"scopeSpans": []}}, "resourceSpans: must be a list, got dict"),
        ({"resourceSpans": ["x"]}, "resourceSpans[0]: must be an object, got str"),
        ({"resourceSpans": [{"resource": []}]},
         "resourceSpans[0].resource: must be an object, got list"),
        ({"resourceSpans": [{"scopeSpans": [{"spans": "none"}]}]},
         "resourceSpans[0].scopeSpans[0].spans: must be a list, got str"),
    ],
)
def test_a_container_of_the_wrong_type_is_refused_with_its_path(document, message):
    with pytest.raises(InvalidPayload) as refused:
        parse_json(json.dumps(document).encode())
    assert str(refused.value) == message


def test_what_only_protobuf_knows_is_wrong_is_refused_with_a_path_too():
    with pytest.raises(InvalidPayload) as refused:
        parse_json(body_with_span(**attribute({"stringValue": "x", "intValue": 1})))
    assert str(refused.value).startswith(f"invalid OTLP/JSON: {WHERE}.attributes[0].value: ")
    assert "multiple" in str(refused.value)


def test_an_unpaired_surrogate_in_a_string_is_refused():
    with pytest.raises(InvalidPayload, match=r"spans\[0\]\.name: Unpaired surrogate"):
        parse_json(body_with_span(name="\ud800"))


def test_numeric_enum_values_pass_the_json_check_and_are_judged_per_span_later():
    # The range check is batch_from_request's (per span, partial success), for both encodings.
    request = parse_json(body_with_span(kind=99, status={"code": 7}))
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert (span.kind, span.status.code) == (99, 7)


def test_a_known_enum_name_is_accepted_and_an_unknown_one_refused():
    named = parse_json(body_with_span(kind="SPAN_KIND_CONSUMER", status={"code": "STATUS_CODE_OK"}))
    span = named.resource_spans[0].scope_spans[0].spans[0]
    assert (span.kind, span.status.code) == (5, 1)
    with pytest.raises(InvalidPayload) as refused:
        parse_json(body_with_span(kind="SPAN_KIND_NEW"))
    assert str(refused.value).startswith(
        f"{WHERE}.kind: 'SPAN_KIND_NEW' is not a SpanKind: OTLP/JSON sends enums as integers")


def test_uppercase_and_mixed_case_hex_ids_read_as_the_same_bytes():
    request = parse_json(body_with_span(traceId=TRACE_HEX.upper(), spanId="EEE19b7ec3c1B174"))
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert (span.trace_id.hex(), span.span_id.hex()) == (TRACE_HEX, SPAN_HEX)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"resourceSpans": [], "resourceSpans": [{}]}',
         "duplicate key 'resourceSpans' (a key may appear once per object)"),
        (body_with_span(name="a").replace(b'"name": "a"', b'"name": "a", "name": "b"'),
         f"{WHERE}: duplicate key 'name' (a key may appear once per object)"),
        (body_with_span(**attribute({"intValue": 1})).replace(
            b'"intValue": 1', b'"intValue": 1, "intValue": 2'),
         f"{WHERE}.attributes[0].value: duplicate key 'intValue' (a key may appear once per "
         "object)"),
    ],
)
def test_a_key_repeated_in_one_object_is_refused_with_its_path(body, message):
    with pytest.raises(InvalidPayload) as refused:
        parse_json(body)
    assert str(refused.value) == message


def test_a_key_repeated_inside_an_unknown_field_is_ignored_with_the_field():
    request = parse_json(body_with_span(futureField={"x": 1}).replace(
        b'{"x": 1}', b'{"x": 1, "x": 2}'))
    assert request.resource_spans[0].scope_spans[0].spans[0].name == "pay"


@pytest.mark.parametrize("body", [b"", b"  \n", b"{}", b'{"resourceSpans": []}',
                                  b'{"resourceSpans": null}'])
def test_an_empty_body_or_document_is_an_empty_request(body):
    assert len(parse_json(body).resource_spans) == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[]", "the body must be a JSON object"),
        (b'{"resourceSpans": [', "invalid JSON"),
        (b'{"a": "\xff"}', "invalid JSON"),
        (b'{"a": ' + b"1" * 5000 + b"}", "invalid JSON"),
        (b"[" * 100_000, "nested too deeply"),
    ],
)
def test_a_body_that_is_not_an_otlp_json_object_is_refused(body, message):
    with pytest.raises(InvalidPayload, match=message):
        parse_json(body)


def test_values_nested_past_the_json_depth_limit_are_refused():
    value: dict[str, Any] = {"stringValue": "x"}
    for _ in range(60):
        value = {"arrayValue": {"values": [value]}}
    with pytest.raises(InvalidPayload, match="nested more than 100 messages deep"):
        parse_json(body_with_span(**attribute(value)))
