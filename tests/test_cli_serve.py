"""`outcomewatch serve` as a user runs it: a real process, real ports, real time (a short
--trace-idle, since a separate process cannot share an injected clock), a real DuckDB file that
outlives the process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from outcomewatch.cli import build_parser

RULES = """
rules:
  - name: signup-welcomed
    owner: growth
    trigger: {span: signup.completed}
    expect: [{span: welcome.sent}]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    def __init__(self, rules: Path, db: Path, trace_idle: str) -> None:
        self.grpc, self.http, self.api = free_port(), free_port(), free_port()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "outcomewatch", "serve", "--rules", str(rules),
             "--db", str(db), "--grpc", f"127.0.0.1:{self.grpc}",
             "--http", f"127.0.0.1:{self.http}", "--api", f"127.0.0.1:{self.api}",
             "--trace-idle", trace_idle],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.api}", timeout=10)
        self.wait_for(self._healthy, "the server to be healthy")

    def _healthy(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"server exited: {self.popen.stdout.read()}")  # type: ignore[union-attr]
        try:
            return self.client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_for(self, probe: Any, what: str, timeout_s: float = 30) -> Any:
        give_up = time.monotonic() + timeout_s
        while not (result := probe()):
            if time.monotonic() > give_up:
                raise AssertionError(f"gave up waiting for {what}")
            time.sleep(0.05)
        return result

    def runs(self, trace_id: str) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self.client.get(
            "/api/v1/runs", params={"trace_id": trace_id}).json()["runs"]
        return runs

    def send_signup(self) -> str:
        provider = TracerProvider(resource=Resource.create({"service.name": "accounts"}))
        provider.add_span_processor(SimpleSpanProcessor(
            OTLPSpanExporter(endpoint=f"127.0.0.1:{self.grpc}", insecure=True)))
        with provider.get_tracer("t").start_as_current_span("signup.completed") as span:
            pass
        provider.shutdown()
        return f"{span.get_span_context().trace_id:032x}"


@contextmanager
def serving(tmp_path: Path, trace_idle: str) -> Iterator[Process]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    process = Process(rules, tmp_path / "data" / "ow.duckdb", trace_idle)
    try:
        yield process
    finally:
        if process.popen.poll() is None:
            process.popen.kill()
        process.popen.wait(timeout=30)
        process.client.close()


def test_serve_fails_a_run_whose_trace_goes_idle_and_exits_0_on_sigterm(tmp_path):
    with serving(tmp_path, "300ms") as server:
        trace_id = server.send_signup()
        run = server.wait_for(
            lambda: [r for r in server.runs(trace_id) if r["status"] == "failed"], "a verdict")[0]
        assert (run["reason"], run["missing"]) == ("trace_idle", ["welcome.sent"])

        server.popen.send_signal(signal.SIGTERM)
        assert server.popen.wait(timeout=30) == 0


def test_a_run_open_when_the_process_is_killed_gets_exactly_one_verdict_after_restart(tmp_path):
    with serving(tmp_path, "1h") as first:
        trace_id = first.send_signup()
        first.wait_for(lambda: first.runs(trace_id), "the run to be stored")
        os.kill(first.popen.pid, signal.SIGKILL)
        first.popen.wait(timeout=30)

    with serving(tmp_path, "300ms") as second:
        runs = second.wait_for(
            lambda: [r for r in second.runs(trace_id) if r["status"] == "failed"], "a verdict")
        assert len(runs) == 1
        assert second.runs(trace_id) == runs
        incidents = second.client.get("/api/v1/incidents").json()["incidents"]
        assert [i["failure_count"] for i in incidents] == [1]


def test_serve_refuses_to_start_on_an_invalid_rule_file_and_names_it(tmp_path):
    rules = tmp_path / "bad.yaml"
    rules.write_text("rules:\n  - name: x\n    trigger: {span: a}\n")
    result = subprocess.run(
        [sys.executable, "-m", "outcomewatch", "serve", "--rules", str(rules),
         "--db", str(tmp_path / "ow.duckdb")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert f"{rules}:2" in result.stderr


def test_every_listener_binds_to_loopback_unless_told_otherwise():
    args = build_parser().parse_args(["serve"])
    assert [args.grpc, args.http, args.api] == [
        ("127.0.0.1", 4317), ("127.0.0.1", 4318), ("127.0.0.1", 8080)]
    explicit = build_parser().parse_args(["serve", "--grpc", "0.0.0.0:4317"])
    assert explicit.grpc == ("0.0.0.0", 4317)
