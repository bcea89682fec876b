"""Load generation for the benchmarks: pre-serialised OTLP requests whose trace ids are fresh on
every send, pushed over a raw gRPC channel with several calls in flight, and the
``outcomewatch serve`` process they go to.

A request template is serialised once with a random placeholder id per trace; it is kept as the
bytes between the placeholders, so that a request with new trace ids is one ``bytes.join``
(a few microseconds for 500 spans) instead of a protobuf build: the client, which shares the
machine's cores with the server, stays cheap, and no trace is ever sent twice (a re-sent trace
would be de-duplicated by the server and open no run).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from bench_ingest import EXPORT, NAMES, _free_port, _kv
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

SPANS_PER_TRACE = 10
RESOURCE: list[tuple[str, str | int]] = [
    ("service.name", "checkout"), ("service.version", "2024.11.3"), ("host.name", "web-7"),
    ("deployment.environment", "prod"), ("cloud.region", "eu-north-1"), ("process.pid", 4242),
    ("telemetry.sdk.name", "opentelemetry"), ("telemetry.sdk.language", "go")]


@dataclass(frozen=True)
class TraceShape:
    """One trace of SPANS_PER_TRACE spans: a root named ``root``, the ``outcomes`` as children,
    the rest filler spans no rule looks at (names of bench_ingest's NAMES)."""

    kind: str
    root: str | None = None
    outcomes: tuple[str, ...] = ()


QUIET = TraceShape("quiet")


def _span(trace_id: bytes, name: str, rng: random.Random, now: int, parent: bytes) -> Span:
    span = Span(trace_id=trace_id, span_id=rng.randbytes(8), parent_span_id=parent, name=name,
                kind=Span.SPAN_KIND_INTERNAL, start_time_unix_nano=now,
                end_time_unix_nano=now + 1_000_000, status=Status(code=Status.STATUS_CODE_OK))
    for a in range(10):
        span.attributes.append(_kv(f"attr.{a}", f"value-{rng.randrange(1000)}"))
    return span


@dataclass(frozen=True)
class Template:
    """A serialised request cut at its trace ids: ``parts[k]``, id of trace ``order[k]``,
    ``parts[k + 1]``, ...; ``shapes[i]`` is trace i's shape."""

    parts: tuple[bytes, ...]
    order: tuple[int, ...]
    shapes: tuple[TraceShape, ...]

    @classmethod
    def build(cls, shapes: Sequence[TraceShape], rng: random.Random) -> Template:
        resource_spans = ResourceSpans()
        for key, value in RESOURCE:
            resource_spans.resource.attributes.append(_kv(key, value))
        scope = ScopeSpans()
        scope.scope.name = "bench"
        now = time.time_ns()
        placeholders = [rng.randbytes(16) for _ in shapes]
        for placeholder, shape in zip(placeholders, shapes, strict=True):
            root_id = rng.randbytes(8)
            names = list(shape.outcomes)
            names += [rng.choice(NAMES) for _ in range(SPANS_PER_TRACE - 1 - len(names))]
            # Children first: they end, and are exported, before their parent.
            for name in names:
                scope.spans.append(_span(placeholder, name, rng, now, root_id))
            root = _span(placeholder, shape.root or rng.choice(NAMES), rng, now, b"")
            root.span_id = root_id
            scope.spans.append(root)
        resource_spans.scope_spans.append(scope)
        body = ExportTraceServiceRequest(resource_spans=[resource_spans]).SerializeToString()
        hits: list[tuple[int, int]] = []
        for index, placeholder in enumerate(placeholders):
            at = body.find(placeholder)
            while at >= 0:
                hits.append((at, index))
                at = body.find(placeholder, at + 16)
        if len(hits) != SPANS_PER_TRACE * len(shapes):  # a placeholder collided with other bytes
            return cls.build(shapes, rng)
        hits.sort()
        parts, previous = [], 0
        for at, _ in hits:
            parts.append(body[previous:at])
            previous = at + 16
        parts.append(body[previous:])
        return cls(tuple(parts), tuple(index for _, index in hits), tuple(shapes))

    def render(self, ids: Sequence[bytes]) -> bytes:
        """The request with trace i's id replaced by ``ids[i]``."""
        pieces = [self.parts[0]]
        for k, index in enumerate(self.order):
            pieces.append(ids[index])
            pieces.append(self.parts[k + 1])
        return b"".join(pieces)


@dataclass
class Workload:
    """Requests ``n = 0, 1, ...``: template ``n % len(templates)``, trace i of request n has id
    ``prefix + (n * traces_per_request + i)`` (8 bytes, big-endian), unique in the run."""

    templates: list[Template]
    prefix: bytes = field(default_factory=lambda: os.urandom(8))

    @property
    def traces_per_request(self) -> int:
        return len(self.templates[0].shapes)

    @property
    def spans_per_request(self) -> int:
        return self.traces_per_request * SPANS_PER_TRACE

    def trace_id(self, n: int, index: int) -> bytes:
        return self.prefix + (n * self.traces_per_request + index).to_bytes(8, "big")

    def request(self, n: int) -> bytes:
        template = self.templates[n % len(self.templates)]
        return template.render([self.trace_id(n, i) for i in range(len(template.shapes))])

    def traces(self, n: int) -> list[tuple[str, TraceShape]]:
        """(hex trace id, shape) of every trace of request n."""
        shapes = self.templates[n % len(self.templates)].shapes
        return [(self.trace_id(n, i).hex(), shape) for i, shape in enumerate(shapes)]


def workload(shape_of: Callable[[int], TraceShape], *, spans: int, templates: int,
             seed: int) -> Workload:
    """``templates`` request templates of ``spans`` spans; trace g (counted across templates)
    has shape ``shape_of(g)``."""
    rng = random.Random(seed)
    per_request = spans // SPANS_PER_TRACE
    return Workload([Template.build([shape_of(t * per_request + i) for i in range(per_request)],
                                    rng) for t in range(templates)])


def parse_rate(load: Workload, seconds: float) -> float:
    """Bare ``ExportTraceServiceRequest.ParseFromString`` spans/s on this workload's requests."""
    bodies = [load.request(n) for n in range(len(load.templates))]
    parsed = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for body in bodies:
            ExportTraceServiceRequest.FromString(body)
            parsed += load.spans_per_request
    return parsed / (time.perf_counter() - started)


@dataclass
class LoadResult:
    acked: list[tuple[int, float, float]]  # (request n, wall-clock send time, ack time)
    refused: dict[str, int]  # gRPC status code name -> count
    started: float  # wall clock
    seconds: float

    def rate(self, spans_per_request: int) -> float:
        return len(self.acked) * spans_per_request / self.seconds


async def push(endpoint: str, load: Workload, *, seconds: float, in_flight: int,
               max_spans: int | None = None, first: int = 0,
               on_ack: Callable[[int, float], None] | None = None) -> LoadResult:
    """Send requests first, first + 1, ... for ``seconds`` (or until ``max_spans`` are
    acknowledged), ``in_flight`` calls at a time; ``on_ack(n, sent)`` is called (in the loop)
    as request n is acknowledged. A refused request is not retried: its traces are simply never
    acknowledged."""
    acked: list[tuple[int, float, float]] = []
    refused: dict[str, int] = {}
    next_n = first
    async with grpc.aio.insecure_channel(endpoint) as channel:
        export = channel.unary_unary(EXPORT, request_serializer=None,
                                     response_deserializer=ExportTraceServiceResponse.FromString)
        stop_at = time.perf_counter() + seconds

        def more() -> bool:
            if max_spans is not None and len(acked) * load.spans_per_request >= max_spans:
                return False
            return time.perf_counter() < stop_at

        async def worker() -> None:
            nonlocal next_n
            while more():
                n, next_n = next_n, next_n + 1
                body = load.request(n)
                sent = time.time()
                try:
                    await export(body, timeout=30)
                    acked.append((n, sent, time.time()))
                    if on_ack:
                        on_ack(n, sent)
                except grpc.aio.AioRpcError as exc:
                    refused[exc.code().name] = refused.get(exc.code().name, 0) + 1

        started_wall, started = time.time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return LoadResult(acked, refused, started_wall, time.perf_counter() - started)


class ServeProcess:
    """``outcomewatch serve`` on free loopback ports with its own DuckDB file in ``workdir``;
    its output goes to ``workdir/serve.log`` (its tail is shown if it fails)."""

    def __init__(self, workdir: Path, rules: Path, trace_idle: str) -> None:
        grpc_port, http_port, api_port = _free_port(), _free_port(), _free_port()
        self.endpoint = f"127.0.0.1:{grpc_port}"
        self.api = f"http://127.0.0.1:{api_port}"
        self.log = workdir / "serve.log"
        command = [sys.executable, "-m", "outcomewatch", "serve", "--rules", str(rules),
                   "--db", str(workdir / "bench.duckdb"),
                   "--grpc", self.endpoint, "--http", f"127.0.0.1:{http_port}",
                   "--api", f"127.0.0.1:{api_port}", "--trace-idle", trace_idle,
                   "--log-level", "warning"]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.process.pid

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"outcomewatch serve exited with {self.process.returncode}: "
                                 f"{self.tail()}")
            try:
                if httpx.get(f"{self.api}/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"outcomewatch serve did not become healthy in {timeout:.0f} s")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def tail(self, lines: int = 5) -> str:
        return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, as an operator stops it; SIGKILL if it has not exited after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
