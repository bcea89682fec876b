"""Test doubles for the receivers: real SDK spans, raw OTLP requests, and a recording sink."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from outcomewatch.otlp import SpanBatch

TRACE_ID = bytes.fromhex("5b8efff798038103d269b633813fc60c")


def sdk_spans(service: str = "checkout") -> list[ReadableSpan]:
    """Two finished SDK spans, a parent and its child, of one trace."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("POST /orders"), tracer.start_as_current_span("charge"):
        pass
    provider.shutdown()
    return list(memory.get_finished_spans())


def raw_request(*span_ids: bytes, service: str = "checkout") -> ExportTraceServiceRequest:
    """One resource, one scope, a span per id (all in TRACE_ID), named span-0, span-1, ..."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.add(key="service.name").value.string_value = service
    scope_spans = resource_spans.scope_spans.add()
    for i, span_id in enumerate(span_ids):
        span = scope_spans.spans.add(name=f"span-{i}", trace_id=TRACE_ID, span_id=span_id)
        span.start_time_unix_nano, span.end_time_unix_nano = 1_000, 2_000
    return request


def nested_value(depth: int, *, kvlist: bool = False, leaf: str = "x") -> AnyValue:
    """A string ``leaf`` inside ``depth`` arrays (or kvlists of one key "k")."""
    value = AnyValue(string_value=leaf)
    for _ in range(depth):
        outer = AnyValue()
        if kvlist:
            outer.kvlist_value.values.add(key="k").value.CopyFrom(value)
        else:
            outer.array_value.values.append(value)
        value = outer
    return value


class RecordingSink:
    """A sink that records every batch, or raises ``fail_with`` instead."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.batches: list[SpanBatch] = []
        self.fail_with = fail_with

    async def __call__(self, batch: SpanBatch) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.batches.append(batch)

    @property
    def span_names(self) -> list[str]:
        return [name for batch in self.batches for _, name in batch.spans_named(batch.names())]
