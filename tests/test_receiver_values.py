"""Values that reach a typed column: against a real ``outcomewatch serve`` process.

A span whose time, kind or status code does not fit what OTLP defines (or what the store's
columns hold) is rejected alone through OTLP partial success, with a message; the good spans of
the same request are stored and acknowledged, and the store stays healthy. Values that reach no
column (dropped counts, flags, event times) are kept as sent. The leniencies of OTLP/JSON are
decided as the README's "Send it traces" says: uppercase hex ids accepted and stored lowercase,
unknown enum names and duplicate keys refused with 400.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from tests.processes import EXPORT, ServeProcess, make_span, read_db, serving

U64_MAX = 2**64 - 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serving(tmp_path_factory.mktemp("values")) as process:
        yield process


def export(server: ServeProcess, spans: list[Span]) -> ExportTraceServiceResponse:
    request = ExportTraceServiceRequest(resource_spans=[
        ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])])
    with grpc.insecure_channel(server.grpc_endpoint) as channel:
        call = channel.unary_unary(EXPORT, request_serializer=None,
                                   response_deserializer=ExportTraceServiceResponse.FromString)
        response: ExportTraceServiceResponse = call(request.SerializeToString(), timeout=30)
    return response


def stored_ids(server: ServeProcess, trace_id: bytes) -> set[str]:
    trace = server.client.get(f"/api/v1/traces/{trace_id.hex()}")
    assert trace.status_code == 200, trace.text
    return {span["span_id"] for span in trace.json()["spans"]}


def bad(trace_id: bytes, **fields: int) -> Span:
    span = make_span(trace_id, "bad")
    for name, value in fields.items():
        if name == "status_code":
            span.status.code = value  # type: ignore[assignment]
        else:
            setattr(span, name, value)
    return span


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"start_time_unix_nano": 2**63},
         f"start_time_unix_nano {2**63} is past 2^63-1 ns (2262-04-11), the latest time "
         "accepted"),
        ({"end_time_unix_nano": U64_MAX},
         f"end_time_unix_nano {U64_MAX} is past 2^63-1 ns (2262-04-11), the latest time "
         "accepted"),
        ({"kind": 2**31 - 1}, f"kind {2**31 - 1} is not an OTLP SpanKind (0 to 5)"),
        ({"kind": -1}, "kind -1 is not an OTLP SpanKind (0 to 5)"),
        ({"kind": 6}, "kind 6 is not an OTLP SpanKind (0 to 5)"),
        ({"status_code": -(2**31)}, f"status.code {-(2**31)} is not an OTLP StatusCode (0 to 2)"),
        ({"status_code": 3}, "status.code 3 is not an OTLP StatusCode (0 to 2)"),
    ],
)
def test_one_bad_span_is_rejected_alone_and_its_good_neighbours_are_stored(
    server: ServeProcess, fields: dict[str, int], message: str
) -> None:
    trace_id = os.urandom(16)
    good = [make_span(trace_id, "good") for _ in range(3)]
    response = export(server, [good[0], bad(trace_id, **fields), *good[1:]])
    assert response.partial_success.rejected_spans == 1
    assert response.partial_success.error_message == (
        f"resource_spans[0].scope_spans[0].spans[1]: {message}")
    assert stored_ids(server, trace_id) == {span.span_id.hex() for span in good}
    assert server.client.get("/readyz").status_code == 200


def test_the_largest_accepted_values_are_stored_as_sent(server: ServeProcess) -> None:
    trace_id = os.urandom(16)
    edge = bad(trace_id, start_time_unix_nano=2**63 - 1, end_time_unix_nano=2**63 - 1, kind=5,
               status_code=2, dropped_attributes_count=2**32 - 1, flags=2**32 - 1,
               dropped_events_count=2**32 - 1, dropped_links_count=2**32 - 1)
    edge.name = "edge"
    edge.events.add(name="late", time_unix_nano=U64_MAX, dropped_attributes_count=2**32 - 1)
    response = export(server, [edge])
    assert response.partial_success.rejected_spans == 0
    [span] = server.client.get(f"/api/v1/traces/{trace_id.hex()}").json()["spans"]
    assert (span["start_ns"], span["kind"], span["status"]) == (2**63 - 1, "consumer", "error")
    assert span["events"][0]["time_ns"] == U64_MAX
    assert server.client.get("/readyz").status_code == 200


def post_json(server: ServeProcess, body: bytes) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{server.http}/v1/traces", content=body,
                      headers={"Content-Type": "application/json"}, timeout=30)


def json_span(trace_hex: str, span_hex: str, **fields: object) -> dict[str, object]:
    return {"traceId": trace_hex, "spanId": span_hex, "name": "json", "startTimeUnixNano": "1",
            "endTimeUnixNano": "2", **fields}


def json_body(*spans: dict[str, object]) -> bytes:
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": list(spans)}]}]}).encode()


def test_json_uppercase_hex_ids_are_accepted_and_stored_lowercase(server: ServeProcess) -> None:
    trace_id, span_id, parent = os.urandom(16), os.urandom(8), os.urandom(8)
    response = post_json(server, json_body(json_span(
        trace_id.hex().upper(), span_id.hex().upper(), parentSpanId=parent.hex().upper())))
    assert response.status_code == 200, response.text
    [span] = server.client.get(f"/api/v1/traces/{trace_id.hex()}").json()["spans"]
    assert (span["span_id"], span["parent_span_id"]) == (span_id.hex(), parent.hex())


def test_json_time_past_the_limit_is_a_partial_success_too(server: ServeProcess) -> None:
    trace_id = os.urandom(16)
    good, late = os.urandom(8), os.urandom(8)
    response = post_json(server, json_body(
        json_span(trace_id.hex(), good.hex()),
        json_span(trace_id.hex(), late.hex(), endTimeUnixNano=str(U64_MAX))))
    assert response.status_code == 200, response.text
    assert response.json()["partialSuccess"]["rejectedSpans"] == "1"
    assert stored_ids(server, trace_id) == {good.hex()}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (json_body(json_span("ab" * 16, "cd" * 8, kind="SPAN_KIND_BOGUS")),
         "resourceSpans[0].scopeSpans[0].spans[0].kind: 'SPAN_KIND_BOGUS' is not a SpanKind"),
        (json_body(json_span("ab" * 16, "cd" * 8, status={"code": "STATUS_CODE_MAYBE"})),
         "resourceSpans[0].scopeSpans[0].spans[0].status.code: 'STATUS_CODE_MAYBE' is not a "
         "StatusCode"),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "' + b"ab" * 16
         + b'", "spanId": "' + b"cd" * 8 + b'", "spanId": "' + b"ef" * 8 + b'"}]}]}]}',
         "resourceSpans[0].scopeSpans[0].spans[0]: duplicate key 'spanId'"),
        (b'{"resourceSpans": [], "resourceSpans": []}', "duplicate key 'resourceSpans'"),
    ],
)
def test_json_unknown_enum_names_and_duplicate_keys_are_refused_with_400(
    server: ServeProcess, body: bytes, message: str
) -> None:
    response = post_json(server, body)
    assert response.status_code == 400
    assert message in response.json()["message"]
    assert server.client.get("/readyz").status_code == 200


def test_nothing_rejected_reached_the_file(server: ServeProcess) -> None:
    """Last: stops the module's server. Every stored value fits its column (the store read
    them back), and no rejected span is in the file."""
    server.terminate()
    rows = read_db(server.db, "SELECT count(*), count(*) FILTER (WHERE name = 'bad'), "
                              "max(kind), max(status_code) FROM spans")
    count, bad_spans, max_kind, max_code = rows[0]
    assert count > 0
    assert (bad_spans, max_kind, max_code) == (0, 5, 2)  # 5 and 2: the edge span
