"""Ingest edge cases end to end: real exporters and raw clients against a running server."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from tests.harness import RunningServer, trace_id_of

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RULE = "payment-failed-updates-access"


def webhook_trace(
    server: RunningServer, *, event_type: str, transport: str = "grpc", emailed: bool = False
) -> str:
    tracer = server.tracer(transport, **{"service.name": "billing"})
    with tracer.start_as_current_span("stripe.webhook", attributes={"event.type": event_type}) as s:
        with tracer.start_as_current_span("entitlement.updated") as child:
            child.set_status(Status(StatusCode.OK))
        if emailed:
            tracer.start_span("email.delivered", attributes={"email.template": "dunning"}).end()
    return trace_id_of(s)


def wait_for_run(server: RunningServer, trace_id: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = server.wait_for(
        lambda: server.runs(trace_id=trace_id), what=f"a run on {trace_id}")
    return runs


def test_a_trigger_whose_where_does_not_match_opens_no_run(server):
    paid = webhook_trace(server, event_type="invoice.paid")
    # A matching trigger sent afterwards is a sync point: runs are stored in arrival order.
    failed = webhook_trace(server, event_type="invoice.payment_failed")

    wait_for_run(server, failed)
    assert server.runs(trace_id=paid) == []


def captured_spans() -> tuple[list[ReadableSpan], str]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "billing"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("dup")
    with tracer.start_as_current_span(
        "stripe.webhook", attributes={"event.type": "invoice.payment_failed"}
    ) as root:
        tracer.start_span("email.delivered", attributes={"email.template": "dunning"}).end()
    provider.shutdown()
    return list(memory.get_finished_spans()), trace_id_of(root)


def test_a_retried_export_does_not_open_a_second_run(server):
    spans, trace_id = captured_spans()
    exporter = OTLPSpanExporter(endpoint=server.grpc_endpoint, insecure=True)
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    server.advance(timedelta(minutes=10, seconds=1))  # the rule's `within`
    server.verdict(trace_id, RULE)
    assert exporter.export(spans) == SpanExportResult.SUCCESS  # again, after the verdict
    exporter.shutdown()
    sync = webhook_trace(server, event_type="invoice.payment_failed", emailed=True)
    assert server.verdict(sync, RULE)["status"] == "passed"

    (run,) = server.runs(trace_id=trace_id)
    assert run["status"] == "failed"
    assert run["missing"] == ["entitlement.updated"]
    incidents = server.get("/api/v1/incidents", rule=RULE)["incidents"]
    assert [i["failure_count"] for i in incidents] == [1]
    stored = server.get(f"/api/v1/traces/{trace_id}")["spans"]
    assert sorted(s["name"] for s in stored) == ["email.delivered", "stripe.webhook"]


def otlp_json(trace_id: str, root_id: str, child_id: str) -> dict[str, Any]:
    def span(span_id: str, parent: str, name: str, **attributes: str) -> dict[str, Any]:
        return {
            "traceId": trace_id, "spanId": span_id, "parentSpanId": parent, "name": name,
            "kind": 2, "startTimeUnixNano": "1764000000000000000",
            "endTimeUnixNano": "1764000000500000000", "status": {"code": 1},
            "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attributes.items()],
        }
    return {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "billing"}}]},
        "scopeSpans": [{"scope": {"name": "json-client"}, "spans": [
            span(child_id, root_id, "entitlement.updated"),
            span(child_id[::-1], root_id, "email.delivered", **{"email.template": "dunning"}),
            span(root_id, "", "stripe.webhook", **{"event.type": "invoice.payment_failed",
                                                   "customer.id": "cus_json"}),
        ]}],
    }]}


def test_otlp_http_json_with_hex_ids_is_accepted_and_evaluated(server):
    trace_id, root_id, child_id = os.urandom(16).hex(), os.urandom(8).hex(), os.urandom(8).hex()
    response = httpx.post(server.http_endpoint, content=json.dumps(
        otlp_json(trace_id, root_id, child_id)), headers={"Content-Type": "application/json"})

    assert response.status_code == 200
    assert server.verdict(trace_id, RULE)["status"] == "passed"
    spans = {s["span_id"]: s for s in server.get(f"/api/v1/traces/{trace_id}")["spans"]}
    assert spans[root_id]["parent_span_id"] == ""
    assert spans[child_id]["parent_span_id"] == root_id
    assert spans[root_id]["attributes"]["customer.id"] == "cus_json"
    assert spans[root_id]["service"] == "billing"
    assert spans[root_id]["kind"] == "server"


def test_malformed_protobuf_over_grpc_is_invalid_argument_and_the_server_keeps_serving(server):
    with grpc.insecure_channel(server.grpc_endpoint) as channel:
        export = channel.unary_unary(EXPORT, request_serializer=None,
                                     response_deserializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            export(b"\x0a\xff\xff\xff\xff\x0fnot-protobuf", timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    trace_id = webhook_trace(server, event_type="invoice.payment_failed")
    assert wait_for_run(server, trace_id)[0]["rule"] == RULE
    metrics = server.api.get("/metrics").text.splitlines()
    assert 'outcomewatch_requests_refused_total{reason="invalid",transport="grpc"} 1.0' in metrics


def test_malformed_protobuf_over_http_is_400_and_the_server_keeps_serving(server):
    response = httpx.post(server.http_endpoint, content=b"\x0a\xff\xff\xff\xff\x0fgarbage",
                          headers={"Content-Type": "application/x-protobuf"})
    assert response.status_code == 400

    trace_id = webhook_trace(server, event_type="invoice.payment_failed", transport="http")
    assert wait_for_run(server, trace_id)[0]["rule"] == RULE
    metrics = server.api.get("/metrics").text.splitlines()
    assert 'outcomewatch_requests_refused_total{reason="invalid",transport="http"} 1.0' in metrics
