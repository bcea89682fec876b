"""`outcomewatch serve` as a separate process, for tests that kill it, flood it or break its disk;
and a raw OTLP/gRPC client that sends pre-serialised requests and records what was acknowledged.

Real ports on 127.0.0.1 only, real time (a separate process cannot share an injected clock). The
server's output goes to a file, never to an undrained pipe that would block it when full.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import grpc
import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from outcomewatch.clock import ManualClock
from outcomewatch.listeners import Address
from outcomewatch.server import Server, Settings
from tests.harness import RunningServer

T = TypeVar("T")

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

SIGNUP_RULES = """
rules:
  - name: signup-welcomed
    owner: growth
    route: growth-oncall
    trigger: {span: signup.completed}
    expect: [{span: welcome.sent}]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(probe: Callable[[], T], what: str, timeout_s: float = 30) -> T:
    """Poll ``probe`` until it returns something truthy. The timeout only bounds a broken run;
    no assertion depends on how long this takes."""
    give_up = time.monotonic() + timeout_s
    while not (result := probe()):
        if time.monotonic() > give_up:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)
    return result


class ServeProcess:
    """One ``python -m outcomewatch serve`` on free loopback ports."""

    def __init__(
        self, *, rules: Path, db: Path, trace_idle: str, args: Sequence[str] = (),
        log: Path | None = None, scheme: str = "http", verify: bool | str = True,
        api_headers: dict[str, str] | None = None,
    ) -> None:
        self.grpc, self.http, self.api = free_port(), free_port(), free_port()
        self.db = db
        self.log_path = log or db.parent / f"serve-{self.grpc}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "outcomewatch", "serve", "--rules", str(rules),
             "--db", str(db), "--grpc", f"127.0.0.1:{self.grpc}",
             "--http", f"127.0.0.1:{self.http}", "--api", f"127.0.0.1:{self.api}",
             "--trace-idle", trace_idle, *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        # Drained by a thread into the log file: a full pipe would block the server, and a file
        # as its stdout would share the file-size limit a test may put on the process.
        self._drain = threading.Thread(target=self._copy_output, daemon=True)
        self._drain.start()
        self.client = httpx.Client(base_url=f"{scheme}://127.0.0.1:{self.api}", timeout=10,
                                   verify=verify, headers=api_headers or {})
        self.wait_for(self._healthy, "the server to be healthy")

    def _copy_output(self) -> None:
        stdout = self.popen.stdout
        assert isinstance(stdout, io.BufferedReader)  # a PIPE, buffered by default
        for chunk in iter(lambda: stdout.read1(65536), b""):
            self._log.write(chunk)
            self._log.flush()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def output(self) -> str:
        if self.popen.poll() is not None:
            self._drain.join(timeout=10)
        return self.log_path.read_text(errors="replace")

    def _healthy(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"server exited {self.popen.returncode}:\n{self.output()}")
        try:
            return self.client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_for(self, probe: Callable[[], T], what: str, timeout_s: float = 30) -> T:
        return wait_for(probe, what, timeout_s)

    def runs(self, **params: Any) -> list[dict[str, Any]]:
        """Every run matching ``params``, all pages."""
        runs: list[dict[str, Any]] = []
        cursor = None
        for _ in range(10_000):
            page = self.client.get("/api/v1/runs", params={
                **params, "limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
            runs.extend(page["runs"])
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return runs

    def rss_kib(self) -> int:
        """The server's resident set size, from /proc (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/PID/status")

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM and the exit code."""
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=30)
        self._drain.join(timeout=10)
        self.client.close()
        self._log.close()


@contextmanager
def serving(
    tmp_path: Path, *, trace_idle: str = "300ms", rules: str = SIGNUP_RULES,
    args: Sequence[str] = (), db: Path | None = None, **kwargs: Any,
) -> Iterator[ServeProcess]:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules)
    process = ServeProcess(rules=rules_file, db=db or tmp_path / "data" / "ow.duckdb",
                           trace_idle=trace_idle, args=args, **kwargs)
    try:
        yield process
    finally:
        process.close()


def read_db(db: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Query the database file of a stopped server, read-only."""
    conn = duckdb.connect(str(db), read_only=True)
    try:
        return conn.execute(sql, list(params)).fetchall()
    finally:
        conn.close()


# -- OTLP requests, built once and sent as bytes ---------------------------------------------


def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def make_span(trace_id: bytes, name: str, *, parent: bytes = b"", size: int = 0,
              attributes: dict[str, str] | None = None) -> Span:
    """A finished span; ``size`` bytes of padding in an attribute make big requests cheaply."""
    now = time.time_ns()
    span = Span(trace_id=trace_id, span_id=os.urandom(8), parent_span_id=parent, name=name,
                start_time_unix_nano=now, end_time_unix_nano=now + 1000,
                status=Status(code=Status.STATUS_CODE_OK))
    for key, value in (attributes or {}).items():
        span.attributes.append(_kv(key, value))
    if size:
        span.attributes.append(_kv("padding", "x" * size))
    return span


def make_request(spans: Sequence[Span], service: str = "accounts") -> bytes:
    resource_spans = ResourceSpans(scope_spans=[ScopeSpans(spans=list(spans))])
    resource_spans.resource.attributes.append(_kv("service.name", service))
    return ExportTraceServiceRequest(resource_spans=[resource_spans]).SerializeToString()


@dataclass(frozen=True)
class Export:
    """One pre-serialised request and the (trace_id, span_id) pairs it carries."""

    body: bytes
    spans: frozenset[tuple[str, str]]

    @classmethod
    def of(cls, spans: Sequence[Span], service: str = "accounts") -> Export:
        return cls(make_request(spans, service),
                   frozenset((s.trace_id.hex(), s.span_id.hex()) for s in spans))


@dataclass
class SignupTraces:
    """Traces for the signup-welcomed rule, spread over a stream of exports.

    Export i carries: a trace with its trigger and outcome (passes at once), a broken trace with
    a trigger and no outcome (fails), the trigger of a split trace whose outcome is in export
    i + 1 (passes, or fails if it goes idle first: either is one verdict), the outcome of the
    previous split trace, and a span no rule looks at.
    """

    exports: list[Export] = field(default_factory=list)
    triggers: set[str] = field(default_factory=set)  # trace ids with a trigger
    broken: set[str] = field(default_factory=set)
    passing: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, count: int, size: int = 0) -> SignupTraces:
        traces = cls()
        pending_outcome: Span | None = None
        for _ in range(count):
            spans: list[Span] = []
            whole, broken, split = os.urandom(16), os.urandom(16), os.urandom(16)
            trigger = make_span(whole, "signup.completed", size=size)
            spans += [make_span(whole, "welcome.sent", parent=trigger.span_id), trigger,
                      make_span(whole, "db.query", parent=trigger.span_id, size=size)]
            spans.append(make_span(broken, "signup.completed", size=size))
            split_trigger = make_span(split, "signup.completed")
            spans.append(split_trigger)
            if pending_outcome is not None:
                spans.append(pending_outcome)
            pending_outcome = make_span(split, "welcome.sent", parent=split_trigger.span_id)
            traces.exports.append(Export.of(spans))
            traces.triggers |= {whole.hex(), broken.hex(), split.hex()}
            traces.broken.add(broken.hex())
            traces.passing.add(whole.hex())
        return traces


class RawClient:
    """Sends pre-serialised exports over one raw gRPC channel (the official exporter serialises
    every time and cannot be killed mid-stream on purpose)."""

    def __init__(self, endpoint: str, *, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self._export = self.channel.unary_unary(EXPORT, request_serializer=None,
                                                response_deserializer=None)
        self._metadata = tuple(metadata)

    def send(self, body: bytes, timeout_s: float = 30) -> grpc.StatusCode:
        """OK once acknowledged, else the status code of the refusal."""
        try:
            self._export(body, timeout=timeout_s, metadata=self._metadata or None)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
        return grpc.StatusCode.OK

    def close(self) -> None:
        self.channel.close()


class Stream:
    """Sends ``exports`` in order from ``workers`` threads (several exports in flight), until all
    are sent or :meth:`stop`; records which were acknowledged and which were refused."""

    def __init__(self, endpoint: str, exports: Sequence[Export], *, workers: int = 4,
                 pause_s: float = 0.0, indices: Sequence[int] | None = None) -> None:
        self.exports = exports
        self._todo = list(range(len(exports)) if indices is None else indices)
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pause_s = pause_s
        self.acked: set[int] = set()
        self.refused: dict[int, grpc.StatusCode] = {}
        self._client = RawClient(endpoint)
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for thread in self._threads:
            thread.start()

    def _take(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._next >= len(self._todo):
                return None
            self._next += 1
            return self._todo[self._next - 1]

    def _work(self) -> None:
        while (index := self._take()) is not None:
            code = self._client.send(self.exports[index].body, timeout_s=20)
            with self._lock:
                if code == grpc.StatusCode.OK:
                    self.acked.add(index)
                else:
                    self.refused[index] = code
            if self._pause_s:
                self._stop.wait(self._pause_s)

    def acked_count(self) -> int:
        with self._lock:
            return len(self.acked)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float = 60) -> None:
        for thread in self._threads:
            thread.join(timeout=timeout_s)
            assert not thread.is_alive(), "a stream worker did not finish"
        self._client.close()

    def acked_spans(self) -> set[tuple[str, str]]:
        return {span for i in self.acked for span in self.exports[i].spans}


# -- an in-process server with any Settings, for tests that need the injected clock or a hand
# on the writer thread -------------------------------------------------------------------------


@contextmanager
def inprocess_server(
    tmp_path: Path, *, rules: str = SIGNUP_RULES, clock: ManualClock | None = None,
    **settings: Any,
) -> Iterator[RunningServer]:
    """Like tests.harness.running_server, with any Settings field overridden."""
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules)
    base: dict[str, Any] = {
        "rules": (str(rules_file),), "db": str(tmp_path / "outcomewatch.duckdb"),
        "grpc": Address("127.0.0.1", 0), "http": Address("127.0.0.1", 0),
        "api": Address("127.0.0.1", 0), "tick": timedelta(milliseconds=20),
        "notify_interval": timedelta(milliseconds=20), "trace_idle": timedelta(seconds=10),
    }
    clock = clock or ManualClock()
    server = Server(Settings(**(base | settings)), clock=clock)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
    api = httpx.Client(base_url=f"http://127.0.0.1:{server.api_port}", timeout=10)
    running = RunningServer(server, clock, loop, api)
    try:
        yield running
    finally:
        for provider in running.providers:
            provider.shutdown()
        api.close()
        try:
            if not getattr(running, "stopped", False):  # a test may have stopped it itself
                asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
