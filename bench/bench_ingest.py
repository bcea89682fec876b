"""Ingest benchmark: how many spans/s does a running outcomewatch acknowledge, compared with the
bare protobuf parse rate measured in the same run on the same machine?

    .venv/bin/python bench/bench_ingest.py [--seconds 20] [--in-flight 8] [--spans 512]

It starts ``outcomewatch serve`` as a separate process (its own GIL, its own DuckDB file, the
example rules and one of its own), sends pre-serialised ExportTraceServiceRequests over a raw
gRPC channel with several calls in flight (the official Python exporter tops out near 14k
spans/s, so it cannot be the load generator), then measures the time from a trace's last span
to its verdict: a passing run (decided the moment the last outcome arrives) and a failing one
(decided after --trace-idle).
Figures vary +-30% between runs on small VMs: quote the ratio, not the absolute rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

ROOT = Path(__file__).resolve().parent.parent
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# Mostly spans no rule looks at, as in real traffic; a few triggers and outcomes.
NAMES = ["GET /api/orders", "db.query", "redis.get", "http.client", "queue.publish",
         "render.template", "cache.lookup", "auth.check"]


def _kv(key: str, value: str | int) -> KeyValue:
    any_value = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(
        string_value=value)
    return KeyValue(key=key, value=any_value)


def build_request(spans: int, rng: random.Random) -> bytes:
    """One request: ``spans`` spans in traces of 16, ~10 attributes each, 8 resource attributes."""
    resource_spans = ResourceSpans()
    resource: list[tuple[str, str | int]] = [
        ("service.name", "checkout"), ("service.version", "2024.11.3"), ("host.name", "web-7"),
        ("deployment.environment", "prod"), ("cloud.region", "eu-north-1"), ("process.pid", 4242),
        ("telemetry.sdk.name", "opentelemetry"), ("telemetry.sdk.language", "go")]
    for key, value in resource:
        resource_spans.resource.attributes.append(_kv(key, value))
    scope = ScopeSpans()
    scope.scope.name = "bench"
    trace_id = rng.randbytes(16)
    now = time.time_ns()
    for i in range(spans):
        if i % 16 == 0:
            trace_id = rng.randbytes(16)
        span = Span(trace_id=trace_id, span_id=rng.randbytes(8), name=rng.choice(NAMES),
                    kind=Span.SPAN_KIND_INTERNAL, start_time_unix_nano=now,
                    end_time_unix_nano=now + 1_000_000, status=Status(code=Status.STATUS_CODE_OK))
        for a in range(10):
            span.attributes.append(_kv(f"attr.{a}", f"value-{rng.randrange(1000)}"))
        scope.spans.append(span)
    resource_spans.scope_spans.append(scope)
    return ExportTraceServiceRequest(resource_spans=[resource_spans]).SerializeToString()


def parse_rate(requests: list[bytes], spans: int, seconds: float) -> float:
    parsed = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for body in requests:
            ExportTraceServiceRequest.FromString(body)
            parsed += spans
    return parsed / (time.perf_counter() - started)


async def sustained_rate(endpoint: str, requests: list[bytes], spans: int, *, seconds: float,
                         in_flight: int) -> tuple[float, int]:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        export = channel.unary_unary(EXPORT, request_serializer=None,
                                     response_deserializer=ExportTraceServiceResponse.FromString)
        acked = 0
        refused = 0
        stop_at = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            nonlocal acked, refused
            i = offset
            while time.perf_counter() < stop_at:
                try:
                    await export(requests[i % len(requests)], timeout=30)
                    acked += spans
                except grpc.aio.AioRpcError:
                    refused += 1
                i += in_flight

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(in_flight)))
        return acked / (time.perf_counter() - started), refused


# The bench's own rule: like the first example rule, but without `within`, so that a failing run
# is decided by --trace-idle and the failing-verdict latency is measurable in seconds.
BENCH_RULES = """
rules:
  - name: bench-payment-failed
    trigger: {span: stripe.webhook, where: {event.type: invoice.payment_failed}}
    expect:
      - {span: entitlement.updated, status: ok}
      - {span: email.delivered, where: {email.template: {in: [payment_failed, dunning]}}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _verdict_span(trace_id: bytes, name: str, attributes: dict[str, str],
                  parent: bytes = b"") -> Span:
    now = time.time_ns()
    span = Span(trace_id=trace_id, span_id=os.urandom(8), parent_span_id=parent, name=name,
                start_time_unix_nano=now, end_time_unix_nano=now + 1000,
                status=Status(code=Status.STATUS_CODE_OK))
    for key, value in attributes.items():
        span.attributes.append(_kv(key, value))
    return span


async def verdict_latency(endpoint: str, api: str, *, passing: bool) -> float:
    """Seconds from the acknowledgement of a trace's last span to its verdict in the API."""
    trace_id = os.urandom(16)
    root = _verdict_span(trace_id, "stripe.webhook", {"event.type": "invoice.payment_failed"})
    children = [_verdict_span(trace_id, "entitlement.updated", {}, root.span_id)]
    if passing:
        children.append(_verdict_span(trace_id, "email.delivered",
                                      {"email.template": "dunning"}, root.span_id))
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        scope_spans=[ScopeSpans(spans=[*children, root])])])
    request.resource_spans[0].resource.attributes.append(_kv("service.name", "billing"))
    async with grpc.aio.insecure_channel(endpoint) as channel:
        export = channel.unary_unary(EXPORT, request_serializer=None,
                                     response_deserializer=ExportTraceServiceResponse.FromString)
        await export(request.SerializeToString(), timeout=30)
    sent = time.perf_counter()
    async with httpx.AsyncClient(base_url=api) as client:
        while True:
            runs = (await client.get("/api/v1/runs", params={"trace_id": trace_id.hex()})).json()
            if any(r["status"] != "open" for r in runs["runs"]):
                return time.perf_counter() - sent
            if time.perf_counter() - sent > 120:
                raise RuntimeError("no verdict within 120 s")
            await asyncio.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--spans", type=int, default=512, help="spans per request")
    parser.add_argument("--trace-idle", default="1s")
    args = parser.parse_args()

    rng = random.Random(7)
    requests = [build_request(args.spans, rng) for _ in range(64)]
    grpc_port, http_port, api_port = _free_port(), _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "bench.yaml").write_text(BENCH_RULES)
        command = [sys.executable, "-m", "outcomewatch", "serve",
                   "--rules", str(ROOT / "rules" / "examples"), "--rules", f"{tmp}/bench.yaml",
                   "--db", f"{tmp}/bench.duckdb",
                   "--grpc", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}",
                   "--api", f"127.0.0.1:{api_port}", "--trace-idle", args.trace_idle,
                   "--log-level", "warning"]
        server = subprocess.Popen(command)
        api = f"http://127.0.0.1:{api_port}"
        try:
            for _ in range(300):
                if server.poll() is not None:
                    raise SystemExit(f"outcomewatch serve exited with {server.returncode}")
                try:
                    if httpx.get(f"{api}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            else:
                raise SystemExit("outcomewatch serve did not become healthy in 30 s")
            endpoint = f"127.0.0.1:{grpc_port}"
            bare = parse_rate(requests, args.spans, seconds=3.0)
            acked, refused = asyncio.run(sustained_rate(
                endpoint, requests, args.spans, seconds=args.seconds, in_flight=args.in_flight))
            passing = asyncio.run(verdict_latency(endpoint, api, passing=True))
            failing = asyncio.run(verdict_latency(endpoint, api, passing=False))
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"bare ParseFromString:        {bare:>12,.0f} spans/s (one core, this process)")
    print(f"sustained, acknowledged:     {acked:>12,.0f} spans/s "
          f"({args.in_flight} calls in flight, {args.spans} spans/request, {refused} refused)")
    print(f"ratio acknowledged / parse:  {acked / bare:>12.3f}")
    print(f"last span -> passed verdict: {passing * 1000:>12.1f} ms")
    print(f"last span -> failed verdict: {failing * 1000:>12.1f} ms (trace idle {args.trace_idle})")


if __name__ == "__main__":
    main()
