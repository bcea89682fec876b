"""The OTLP/gRPC receiver, served for real on a free port, exercised by the official OTel
exporter and by a raw grpc channel (for what the exporter never sends)."""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import pytest
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace.export import SpanExportResult

from outcomewatch.errors import Overloaded, StoreError
from outcomewatch.receiver import Limits, start_grpc_receiver
from outcomewatch.receiver.limits import MiB
from tests.servers import run_in, running_event_loop
from tests.spans import RecordingSink, nested_value, raw_request, sdk_spans

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
GOOD_ID, OTHER_ID = bytes.fromhex("00f067aa0ba902b7"), bytes.fromhex("53995c3f42cd8ad8")


@contextmanager
def grpc_receiver(
    sink: RecordingSink,
    limits: Limits | None = None,
    clock_ns: Callable[[], int] | None = None,
    token: str | None = None,
) -> Iterator[int]:
    """Serve the receiver on its own loop thread; yield the port."""
    with running_event_loop() as loop:
        server, port = run_in(
            loop,
            start_grpc_receiver(
                sink, host="127.0.0.1", port=0, limits=limits or Limits(),
                clock_ns=clock_ns or time.time_ns, token=token,
            ),
        )
        try:
            yield port
        finally:
            run_in(loop, server.stop(None))


@contextmanager
def raw_export(port: int) -> Iterator[grpc.UnaryUnaryMultiCallable]:
    """Export over a plain channel: sends any bytes, decodes the response."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel.unary_unary(
            EXPORT,
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_it_hands_the_spans_of_the_official_exporter_to_the_sink():
    sink = RecordingSink()
    spans = sdk_spans(service="checkout")
    with grpc_receiver(sink, clock_ns=lambda: 1234) as port:
        exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True)
        assert exporter.export(spans) == SpanExportResult.SUCCESS
        exporter.shutdown()
    [batch] = sink.batches
    by_name = {span.name: span for span in spans}
    assert sorted(batch.name) == ["POST /orders", "charge"]
    for i, name in enumerate(batch.name):
        assert batch.trace_id[i] == format(by_name[name].context.trace_id, "032x")
        assert batch.span_id[i] == format(by_name[name].context.span_id, "016x")
    assert batch.service == ["checkout", "checkout"]
    assert batch.received_ns == 1234


def test_it_accepts_a_gzip_compressed_export_from_the_official_exporter():
    sink = RecordingSink()
    with grpc_receiver(sink) as port:
        exporter = OTLPSpanExporter(
            endpoint=f"127.0.0.1:{port}", insecure=True, compression=grpc.Compression.Gzip
        )
        assert exporter.export(sdk_spans()) == SpanExportResult.SUCCESS
        exporter.shutdown()
    assert sorted(sink.span_names) == ["POST /orders", "charge"]


def test_it_answers_garbage_bytes_with_invalid_argument_saying_what_is_wrong():
    sink = RecordingSink()
    with grpc_receiver(sink) as port, raw_export(port) as export:
        error = rpc_error(lambda: export(b"\xff\xff\xff\xff not protobuf", timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid protobuf ExportTraceServiceRequest" in error.details()
    assert sink.batches == []


def test_it_keeps_serving_after_a_malformed_request():
    sink = RecordingSink()
    with grpc_receiver(sink) as port, raw_export(port) as export:
        rpc_error(lambda: export(b"\xff\xff\xff\xff", timeout=5))
        response = export(raw_request(GOOD_ID).SerializeToString(), timeout=5)
    assert response == ExportTraceServiceResponse()
    assert sink.span_names == ["span-0"]


def test_it_rejects_only_the_span_with_a_wrong_id_length_as_a_partial_success():
    sink = RecordingSink()
    request = raw_request(GOOD_ID, b"\x01\x02\x03", OTHER_ID)
    with grpc_receiver(sink) as port, raw_export(port) as export:
        response = export(request.SerializeToString(), timeout=5)
    assert response.partial_success.rejected_spans == 1
    assert "spans[1]: span_id must be 8 bytes, got 3" in response.partial_success.error_message
    assert sink.span_names == ["span-0", "span-2"]


def test_it_does_not_call_the_sink_when_every_span_is_rejected():
    sink = RecordingSink(fail_with=AssertionError("the sink must not be called"))
    with grpc_receiver(sink) as port, raw_export(port) as export:
        response = export(raw_request(b"short").SerializeToString(), timeout=5)
    assert response.partial_success.rejected_spans == 1


def test_it_answers_unavailable_with_a_retry_delay_when_the_sink_is_overloaded():
    sink = RecordingSink(fail_with=Overloaded("ingest queue full", retry_after_s=2.5))
    with grpc_receiver(sink) as port, raw_export(port) as export:
        error = rpc_error(lambda: export(raw_request(GOOD_ID).SerializeToString(), timeout=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "overloaded: ingest queue full"
    trailers = dict(error.trailing_metadata())
    assert RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"]).retry_delay.seconds == 3
    status = Status.FromString(trailers["grpc-status-details-bin"])
    retry_info = RetryInfo()
    assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert status.details[0].Unpack(retry_info)
    assert retry_info.retry_delay.seconds == 3


def test_it_answers_unavailable_when_the_store_fails():
    sink = RecordingSink(fail_with=StoreError("disk full"))
    with grpc_receiver(sink) as port, raw_export(port) as export:
        error = rpc_error(lambda: export(raw_request(GOOD_ID).SerializeToString(), timeout=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "storage failure: disk full"


def test_it_answers_internal_when_the_sink_fails_unexpectedly_and_keeps_serving():
    sink = RecordingSink(fail_with=KeyError("bug"))
    with grpc_receiver(sink) as port, raw_export(port) as export:
        error = rpc_error(lambda: export(raw_request(GOOD_ID).SerializeToString(), timeout=5))
        sink.fail_with = None
        export(raw_request(GOOD_ID).SerializeToString(), timeout=5)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "KeyError" in error.details()
    assert sink.span_names == ["span-0"]


def test_it_refuses_a_message_over_the_size_limit_with_resource_exhausted():
    sink = RecordingSink()
    with (
        grpc_receiver(sink, Limits(max_request_bytes=64 * 1024)) as port,
        raw_export(port) as export,
    ):
        error = rpc_error(lambda: export(bytes(100 * 1024), timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sink.batches == []


def test_it_refuses_a_small_gzip_message_that_inflates_past_the_size_limit():
    # 8 MiB of one repeated letter: ~8 KiB once gzip-compressed, well under the 1 MiB limit.
    request = ExportTraceServiceRequest()
    request.resource_spans.add().scope_spans.add().spans.add(name="a" * (8 * MiB))
    body = request.SerializeToString()
    assert len(gzip.compress(body)) < 64 * 1024
    sink = RecordingSink()
    with grpc_receiver(sink, Limits(max_request_bytes=1 * MiB)) as port, raw_export(port) as export:
        error = rpc_error(lambda: export(body, compression=grpc.Compression.Gzip, timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Decompressed message larger than max" in error.details()
    assert sink.batches == []


def test_it_refuses_to_start_on_a_port_already_in_use():
    with (
        grpc_receiver(RecordingSink()) as port,
        running_event_loop() as loop,
        pytest.raises(OSError, match="cannot bind"),
    ):
        run_in(
            loop,
            start_grpc_receiver(RecordingSink(), host="127.0.0.1", port=port, limits=Limits()),
        )


def test_it_rejects_only_the_spans_over_the_limits_as_a_partial_success():
    request = raw_request(GOOD_ID, OTHER_ID, bytes([3]) * 8)
    spans = request.resource_spans[0].scope_spans[0].spans
    for k in range(5):
        spans[0].attributes.add(key=f"a{k}").value.int_value = k
    spans[2].attributes.add(key="deep").value.CopyFrom(nested_value(3))
    sink = RecordingSink()
    limits = Limits(max_attributes_per_span=4, max_value_depth=2)
    with grpc_receiver(sink, limits) as port, raw_export(port) as export:
        response = export(request.SerializeToString(), timeout=5)
    assert response.partial_success.rejected_spans == 2
    assert response.partial_success.error_message == (
        "resource_spans[0].scope_spans[0].spans[0]: 5 attributes, limit 4; "
        "resource_spans[0].scope_spans[0].spans[2]: attributes['deep'][0][0]: "
        "value nested deeper than 2 levels (the limit)"
    )
    assert sink.span_names == ["span-1"]


def test_it_answers_invalid_utf8_with_invalid_argument_and_keeps_serving():
    body = raw_request(GOOD_ID).SerializeToString().replace(b"span-0", b"span-\xff")
    sink = RecordingSink()
    with grpc_receiver(sink) as port, raw_export(port) as export:
        error = rpc_error(lambda: export(body, timeout=5))
        export(raw_request(GOOD_ID).SerializeToString(), timeout=5)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid UTF-8" in error.details()
    assert sink.span_names == ["span-0"]


def test_it_acknowledges_an_empty_request_without_calling_the_sink():
    sink = RecordingSink(fail_with=AssertionError("the sink must not be called"))
    with grpc_receiver(sink) as port, raw_export(port) as export:
        assert export(b"", timeout=5) == ExportTraceServiceResponse()


def test_with_a_token_it_accepts_the_official_exporter_sending_it():
    sink = RecordingSink()
    with grpc_receiver(sink, token="s3cret") as port:
        exporter = OTLPSpanExporter(
            endpoint=f"127.0.0.1:{port}", insecure=True,
            headers=(("authorization", "Bearer s3cret"),),
        )
        assert exporter.export(sdk_spans()) == SpanExportResult.SUCCESS
        exporter.shutdown()
    assert sorted(sink.span_names) == ["POST /orders", "charge"]


def test_with_a_token_it_refuses_the_official_exporter_without_it():
    sink = RecordingSink()
    with grpc_receiver(sink, token="s3cret") as port:
        exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True, timeout=5)
        assert exporter.export(sdk_spans()) == SpanExportResult.FAILURE
        exporter.shutdown()
    assert sink.batches == []


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),),
     (("authorization", "Basic s3cret"),), (("x-token", "Bearer s3cret"),)],
)
def test_with_a_token_it_answers_unauthenticated_to_any_other_credentials(metadata):
    sink = RecordingSink()
    body = raw_request(GOOD_ID).SerializeToString()
    with grpc_receiver(sink, token="s3cret") as port, raw_export(port) as export:
        error = rpc_error(lambda: export(body, metadata=metadata, timeout=5))
        served = export(body, metadata=(("authorization", "bearer s3cret"),), timeout=5)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in error.details()
    assert served == ExportTraceServiceResponse()
    assert sink.span_names == ["span-0"]


@pytest.mark.parametrize("token", ["", "two words", "caf\u00e9"])
def test_it_refuses_to_start_with_a_token_no_client_could_send(token):
    with running_event_loop() as loop, pytest.raises(ValueError, match="bearer token"):
        run_in(loop, start_grpc_receiver(
            RecordingSink(), host="127.0.0.1", port=0, limits=Limits(), token=token
        ))
