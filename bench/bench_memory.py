"""Live-state memory: bytes the engine holds per live trace, beyond the spans it holds.

    .venv/bin/python bench/bench_memory.py [--traces 100000]

Loads the example rules (``rules/examples``, whose longest ``within`` is 2h) into the real
engine and makes ``--traces`` traces live, in two shapes, each in a fresh engine:

- ``outcome only``: one ``email.delivered`` span per trace and no trigger: the trace is held for
  the longest ``within``, in case its trigger (a long root span) is exported last;
- ``open run``: one ``stripe.webhook`` trigger per trace: an open run waiting for its outcomes.

Measured with ``tracemalloc``: the spans are decoded first and kept by the benchmark, so the
difference in traced memory before and after the engine sees them is the engine's own state per
trace (what "beyond held spans" means); the size of one decoded span is printed beside it. Also
printed: what the engine estimates for the same state (``Engine.live_bytes``, what
``--max-live-bytes`` is compared with), so that the estimate can be checked against the
measurement. One run, figures vary with the Python version; compare within one run.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from outcomewatch.analyzer.engine import Engine
from outcomewatch.clock import ManualClock
from outcomewatch.model import Span
from outcomewatch.otlp import batch_from_request
from outcomewatch.rules import load_rules

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 500  # spans per request, as exporters batch them


def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def decoded_spans(count: int, name: str) -> list[tuple[Span, int]]:
    """``count`` spans named ``name``, one per trace, with a few attributes, decoded as the
    engine receives them, and their receive times."""
    resource = Resource(attributes=[_kv("service.name", "billing"), _kv("host.name", "web-1"),
                                    _kv("service.version", "2026.12.1")])
    now = time.time_ns()
    out: list[tuple[Span, int]] = []
    for first in range(0, count, CHUNK):
        spans = [PbSpan(trace_id=os.urandom(16), span_id=os.urandom(8), name=name,
                        start_time_unix_nano=now, end_time_unix_nano=now + 1000,
                        attributes=[_kv("customer.id", f"cus_{first + i:08d}"),
                                    _kv("subscription.id", f"sub_{first + i:08d}"),
                                    _kv("event.type", "invoice.payment_failed"),
                                    _kv("email.template", "payment_failed")])
                 for i in range(min(CHUNK, count - first))]
        request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
            resource=resource, scope_spans=[ScopeSpans(spans=spans)])])
        batch = batch_from_request(request, received_ns=now)
        out.extend((batch.decode(i), now) for i in range(len(batch)))
    return out


def measure(label: str, name: str, count: int, engine_of: Callable[[], Engine]) -> None:
    gc.collect()
    tracemalloc.start()
    before_spans = tracemalloc.get_traced_memory()[0]
    spans = decoded_spans(count, name)
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    engine = engine_of()
    for first in range(0, count, CHUNK):
        engine.replay(spans[first:first + CHUNK])
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert engine.live_traces == count, "every trace should still be live"
    per_trace = (after - before) / count
    per_span = (before - before_spans) / count
    print(f"{label:<13} {count:>8} live traces: {per_trace:7.0f} B/trace engine state "
          f"(estimate {engine.live_bytes / count:6.0f} B/trace incl. held spans), "
          f"a held span itself {per_span:5.0f} B; total {(after - before) / 2**20:6.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=100_000)
    args = parser.parse_args()
    rules = load_rules([ROOT / "rules" / "examples"])

    def engine() -> Engine:
        return Engine(rules, idle=timedelta(seconds=10), clock=ManualClock())

    measure("outcome only", "email.delivered", args.traces, engine)
    measure("open run", "stripe.webhook", args.traces, engine)


if __name__ == "__main__":
    main()
