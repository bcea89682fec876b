"""The OTLP/HTTP receiver, served for real by uvicorn on a free port, exercised by the official
OTel exporter and by httpx (for what the exporter never sends)."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from google.rpc.status_pb2 import Status
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace.export import SpanExportResult

from outcomewatch.errors import InvalidPayload, Overloaded, PayloadTooLarge, StoreError
from outcomewatch.receiver import Limits, create_http_receiver
from outcomewatch.receiver.limits import BoundedInflater, MiB
from tests.servers import running_asgi
from tests.spans import RecordingSink, raw_request, sdk_spans

PROTOBUF = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}
GOOD_ID = bytes.fromhex("00f067aa0ba902b7")


@contextmanager
def http_receiver(
    sink: RecordingSink, limits: Limits | None = None, token: str | None = None
) -> Iterator[httpx.Client]:
    """Serve the receiver with uvicorn; yield an httpx client for it."""
    app = create_http_receiver(sink, limits=limits or Limits(), clock_ns=lambda: 1234, token=token)
    with running_asgi(app) as base_url, httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


def post(client: httpx.Client, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return client.post("/v1/traces", content=body, headers=headers)


def protobuf_status(response: httpx.Response) -> Status:
    assert response.headers["content-type"] == "application/x-protobuf"
    return Status.FromString(response.content)


@pytest.mark.parametrize(
    "compression", [Compression.NoCompression, Compression.Gzip, Compression.Deflate]
)
def test_it_hands_the_spans_of_the_official_exporter_to_the_sink(compression):
    sink = RecordingSink()
    spans = sdk_spans(service="checkout")
    app = create_http_receiver(sink, limits=Limits(), clock_ns=lambda: 1234)
    with running_asgi(app) as base_url:
        exporter = OTLPSpanExporter(endpoint=f"{base_url}/v1/traces", compression=compression)
        assert exporter.export(spans) == SpanExportResult.SUCCESS
        exporter.shutdown()  # type: ignore[no-untyped-call]  # unannotated upstream
    [batch] = sink.batches
    by_name = {span.name: span for span in spans}
    assert sorted(batch.name) == ["POST /orders", "charge"]
    for i, name in enumerate(batch.name):
        assert batch.trace_id[i] == format(by_name[name].context.trace_id, "032x")
        assert batch.span_id[i] == format(by_name[name].context.span_id, "016x")
    assert batch.service == ["checkout", "checkout"]
    assert batch.received_ns == 1234


def test_it_accepts_otlp_json_with_hex_ids_and_answers_in_json():
    document = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "cart"}}]
                },
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "5B8EFFF798038103D269B633813FC60C",
                                "spanId": "eee19b7ec3c1b174",
                                "parentSpanId": "",
                                "name": "add item",
                                "kind": 2,
                                "startTimeUnixNano": "1544712660000000000",
                                "endTimeUnixNano": "1544712661000000000",
                            }
                        ]
                    }
                ],
            }
        ]
    }
    sink = RecordingSink()
    with http_receiver(sink) as client:
        response = post(
            client,
            json.dumps(document).encode(),
            {"Content-Type": "application/json; charset=utf-8"},
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {}
    [batch] = sink.batches
    assert batch.trace_id == ["5b8efff798038103d269b633813fc60c"]
    assert batch.span_id == ["eee19b7ec3c1b174"]
    assert batch.parent_span_id == [""]
    assert (batch.name, batch.service, batch.kind) == (["add item"], ["cart"], [2])


def test_it_reports_rejected_spans_as_a_partial_success_in_protobuf():
    sink = RecordingSink()
    with http_receiver(sink) as client:
        response = post(client, raw_request(GOOD_ID, b"\x01").SerializeToString(), PROTOBUF)
    assert response.status_code == 200
    partial = ExportTraceServiceResponse.FromString(response.content).partial_success
    assert partial.rejected_spans == 1
    assert "spans[1]: span_id must be 8 bytes, got 1" in partial.error_message
    assert sink.span_names == ["span-0"]


def test_it_reports_rejected_spans_as_a_partial_success_in_json():
    document = {
        "resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "00" * 16, "spanId": "01" * 8}]}]}]
    }
    with http_receiver(RecordingSink()) as client:
        response = post(client, json.dumps(document).encode(), JSON)
    assert response.status_code == 200
    assert response.json() == {
        "partialSuccess": {
            "rejectedSpans": "1",
            "errorMessage": (
                "resource_spans[0].scope_spans[0].spans[0]: trace_id must not be all zeros"
            ),
        }
    }


def test_it_answers_garbage_protobuf_with_400_and_a_status_body():
    sink = RecordingSink()
    with http_receiver(sink) as client:
        response = post(client, b"\xff\xff\xff\xff not protobuf", PROTOBUF)
    assert response.status_code == 400
    status = protobuf_status(response)
    assert status.code == 3  # INVALID_ARGUMENT
    assert "invalid protobuf ExportTraceServiceRequest" in status.message
    assert sink.batches == []


def test_it_answers_malformed_json_with_400_and_a_json_status_body():
    with http_receiver(RecordingSink()) as client:
        body = b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": 7}]}]}]}'
        response = post(client, body, JSON)
    assert response.status_code == 400
    assert response.json() == {
        "code": 3,
        "message": "resourceSpans[0].scopeSpans[0].spans[0].spanId: must be a hex string, got int",
    }


def test_it_answers_deeply_nested_json_with_400():
    with http_receiver(RecordingSink()) as client:
        response = post(client, b"[" * 100_000, JSON)
    assert response.status_code == 400
    assert "nested too deeply" in response.json()["message"]


def test_it_refuses_a_gzip_bomb_with_413_without_inflating_it():
    # 200 MB of zeros, compressed chunk by chunk (~200 KB): never held whole in this test.
    deflater = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    chunk = bytes(MiB)
    bomb = b"".join(deflater.compress(chunk) for _ in range(200)) + deflater.flush()
    assert len(bomb) < 1 * MiB
    sink = RecordingSink()
    with http_receiver(sink, Limits(max_decompressed_bytes=8 * MiB)) as client:
        tracemalloc.start()
        try:
            response = post(client, bomb, {**PROTOBUF, "Content-Encoding": "gzip"})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert response.status_code == 413
    assert "inflates to more than 8388608 bytes" in protobuf_status(response).message
    assert peak < 32 * MiB
    assert sink.batches == []


def test_it_answers_an_invalid_gzip_body_with_400():
    with http_receiver(RecordingSink()) as client:
        response = post(client, b"not gzip at all", {**PROTOBUF, "Content-Encoding": "gzip"})
    assert response.status_code == 400
    assert "invalid gzip body" in protobuf_status(response).message


def test_it_answers_a_truncated_gzip_body_with_400():
    body = gzip.compress(raw_request(GOOD_ID).SerializeToString())[:-4]
    with http_receiver(RecordingSink()) as client:
        response = post(client, body, {**PROTOBUF, "Content-Encoding": "gzip"})
    assert response.status_code == 400
    assert "truncated" in protobuf_status(response).message


def test_it_refuses_a_body_declared_over_the_limit_with_413():
    with http_receiver(RecordingSink(), Limits(max_request_bytes=1024)) as client:
        response = post(client, bytes(4096), PROTOBUF)
    assert response.status_code == 413
    assert "over the limit of 1024 bytes" in protobuf_status(response).message


def test_it_refuses_a_chunked_body_over_the_limit_with_413():
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield bytes(512)

    with http_receiver(RecordingSink(), Limits(max_request_bytes=1024)) as client:
        response = client.post("/v1/traces", content=chunks(), headers=PROTOBUF)
    assert response.status_code == 413


def test_it_answers_an_unsupported_content_type_with_415_naming_the_supported_ones():
    with http_receiver(RecordingSink()) as client:
        response = post(client, b"x", {"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert "application/x-protobuf" in response.text
    assert "application/json" in response.text


def test_it_answers_an_unsupported_content_encoding_with_415():
    with http_receiver(RecordingSink()) as client:
        response = post(client, b"x", {**PROTOBUF, "Content-Encoding": "br"})
    assert response.status_code == 415
    assert "unsupported Content-Encoding 'br'" in protobuf_status(response).message


def test_it_answers_503_with_retry_after_when_the_sink_is_overloaded():
    sink = RecordingSink(fail_with=Overloaded("ingest queue full", retry_after_s=2.5))
    with http_receiver(sink) as client:
        response = post(client, raw_request(GOOD_ID).SerializeToString(), PROTOBUF)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert protobuf_status(response).code == 14  # UNAVAILABLE


def test_it_answers_503_with_retry_after_when_the_store_fails():
    sink = RecordingSink(fail_with=StoreError("disk full"))
    with http_receiver(sink) as client:
        response = post(client, raw_request(GOOD_ID).SerializeToString(), PROTOBUF)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert protobuf_status(response).message == "storage failure: disk full"


def test_it_answers_500_when_the_sink_fails_unexpectedly_and_keeps_serving():
    sink = RecordingSink(fail_with=KeyError("bug"))
    with http_receiver(sink) as client:
        failed = post(client, raw_request(GOOD_ID).SerializeToString(), PROTOBUF)
        sink.fail_with = None
        served = post(client, raw_request(GOOD_ID).SerializeToString(), PROTOBUF)
    assert failed.status_code == 500
    assert "KeyError" in protobuf_status(failed).message
    assert served.status_code == 200


def test_it_answers_404_for_any_other_path():
    with http_receiver(RecordingSink()) as client:
        response = client.post("/v1/traces/", content=b"", headers=PROTOBUF)
    assert response.status_code == 404


def test_it_answers_405_for_any_other_method():
    with http_receiver(RecordingSink()) as client:
        response = client.get("/v1/traces")
    assert response.status_code == 405


def test_the_inflater_decodes_concatenated_gzip_members_fed_byte_by_byte():
    body = gzip.compress(b"hello ") + gzip.compress(b"world")
    inflater = BoundedInflater("gzip", limit=11)
    for i in range(len(body)):
        inflater.feed(body[i : i + 1])
    assert inflater.finish() == b"hello world"


def test_the_inflater_refuses_output_one_byte_over_its_limit():
    inflater = BoundedInflater("deflate", limit=10)
    with pytest.raises(PayloadTooLarge):
        inflater.feed(zlib.compress(bytes(11)))


def test_the_inflater_refuses_an_empty_body():
    with pytest.raises(InvalidPayload, match="truncated or empty"):
        BoundedInflater("gzip", limit=10).finish()


def test_limits_refuse_a_size_that_is_not_a_positive_int():
    with pytest.raises(ValueError, match="max_decompressed_bytes must be a positive int"):
        Limits(max_decompressed_bytes=0)


def test_it_reports_spans_over_the_limits_as_a_partial_success():
    request = raw_request(GOOD_ID, bytes([2]) * 8)
    big = request.resource_spans[0].scope_spans[0].spans[1].events.add(name="log")
    big.attributes.add(key="body").value.string_value = "x" * 2000
    sink = RecordingSink()
    with http_receiver(sink, Limits(max_attribute_value_bytes=1024)) as client:
        response = post(client, request.SerializeToString(), PROTOBUF)
    assert response.status_code == 200
    partial = ExportTraceServiceResponse.FromString(response.content).partial_success
    assert partial.rejected_spans == 1
    assert partial.error_message == (
        "resource_spans[0].scope_spans[0].spans[1]: events[0].attributes['body']: "
        "value of 2000 bytes, limit 1024"
    )
    assert sink.span_names == ["span-0"]


def test_it_answers_invalid_utf8_in_protobuf_with_400_saying_so():
    body = raw_request(GOOD_ID).SerializeToString().replace(b"span-0", b"span-\xc3")
    with http_receiver(RecordingSink()) as client:
        response = post(client, body, PROTOBUF)
    assert response.status_code == 400
    assert "invalid UTF-8" in protobuf_status(response).message


@pytest.mark.parametrize(("body", "headers"), [(b"", PROTOBUF), (b"", JSON), (b"{}", JSON)])
def test_it_acknowledges_an_empty_request(body, headers):
    sink = RecordingSink(fail_with=AssertionError("the sink must not be called"))
    with http_receiver(sink) as client:
        response = post(client, body, headers)
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("span", "message"),
    [
        ({"traceId": 5}, "resourceSpans[0].scopeSpans[0].spans[0].traceId: must be a hex string"),
        ({"attributes": [{"key": "a", "value": "x"}]},
         "resourceSpans[0].scopeSpans[0].spans[0].attributes[0].value: must be an object"),
    ],
)
def test_it_answers_json_of_the_wrong_types_with_400_naming_the_field(span, message):
    body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}).encode()
    with http_receiver(RecordingSink()) as client:
        response = post(client, body, JSON)
    assert response.status_code == 400
    assert response.json()["message"].startswith(message)


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_with_a_token_it_accepts_the_official_exporter_sending_it(compression):
    sink = RecordingSink()
    app = create_http_receiver(sink, limits=Limits(), token="s3cret")
    with running_asgi(app) as base_url:
        exporter = OTLPSpanExporter(
            endpoint=f"{base_url}/v1/traces", compression=compression,
            headers={"authorization": "Bearer s3cret"},
        )
        assert exporter.export(sdk_spans()) == SpanExportResult.SUCCESS
        exporter.shutdown()  # type: ignore[no-untyped-call]  # unannotated upstream
    assert sorted(sink.span_names) == ["POST /orders", "charge"]


def test_with_a_token_it_refuses_the_official_exporter_without_it():
    sink = RecordingSink()
    app = create_http_receiver(sink, limits=Limits(), token="s3cret")
    with running_asgi(app) as base_url:
        exporter = OTLPSpanExporter(endpoint=f"{base_url}/v1/traces", timeout=5)
        assert exporter.export(sdk_spans()) == SpanExportResult.FAILURE
        exporter.shutdown()  # type: ignore[no-untyped-call]  # unannotated upstream
    assert sink.batches == []


@pytest.mark.parametrize(
    ("authorization", "challenge"),
    [(None, "Bearer"), ("Bearer wrong", 'Bearer error="invalid_token"'),
     ("Basic s3cret", 'Bearer error="invalid_token"'), ("s3cret", 'Bearer error="invalid_token"')],
)
def test_with_a_token_it_answers_401_to_any_other_credentials(authorization, challenge):
    sink = RecordingSink()
    body = raw_request(GOOD_ID).SerializeToString()
    credentials = {"Authorization": authorization} if authorization else {}
    with http_receiver(sink, token="s3cret") as client:
        refused = post(client, body, {**PROTOBUF, **credentials})
        served = post(client, body, {**PROTOBUF, "Authorization": "bearer s3cret"})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == challenge
    assert protobuf_status(refused).code == 16  # UNAUTHENTICATED
    assert served.status_code == 200
    assert sink.span_names == ["span-0"]


def test_with_a_token_it_answers_401_before_looking_at_the_body_or_its_type():
    with http_receiver(RecordingSink(), token="s3cret") as client:
        as_json = post(client, b"not json", JSON)
        untyped = post(client, b"x", {"Content-Type": "text/plain"})
    assert (as_json.status_code, untyped.status_code) == (401, 401)
    assert "bearer token" in as_json.json()["message"]
    assert untyped.headers["www-authenticate"] == "Bearer"


def test_it_refuses_to_create_a_receiver_with_a_token_no_client_could_send():
    with pytest.raises(ValueError, match="bearer token"):
        create_http_receiver(RecordingSink(), limits=Limits(), token="with space")
