"""`outcomewatch serve` as a user runs it (started by tests/processes.py): a real process, real
ports, real time (a short --trace-idle, since a separate process cannot share an injected
clock), a real DuckDB file that outlives the process."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from outcomewatch.cli import build_parser
from tests.processes import ServeProcess, serving


def send_signup(server: ServeProcess) -> str:
    """A signup trace with no welcome, through the official OTLP/gRPC exporter."""
    provider = TracerProvider(resource=Resource.create({"service.name": "accounts"}))
    provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=server.grpc_endpoint, insecure=True)))
    with provider.get_tracer("t").start_as_current_span("signup.completed") as span:
        pass
    provider.shutdown()
    return f"{span.get_span_context().trace_id:032x}"


def runs_of(server: ServeProcess, trace_id: str) -> list[dict[str, Any]]:
    return server.runs(trace_id=trace_id)


def test_serve_fails_a_run_whose_trace_goes_idle_and_exits_0_on_sigterm(tmp_path):
    with serving(tmp_path, trace_idle="300ms") as server:
        trace_id = send_signup(server)
        run = server.wait_for(
            lambda: [r for r in runs_of(server, trace_id) if r["status"] == "failed"],
            "a verdict")[0]
        assert (run["reason"], run["missing"]) == ("trace_idle", ["welcome.sent"])

        assert server.terminate() == 0  # SIGTERM


def test_a_run_open_when_the_process_is_killed_gets_exactly_one_verdict_after_restart(tmp_path):
    with serving(tmp_path, trace_idle="1h") as first:
        trace_id = send_signup(first)
        first.wait_for(lambda: runs_of(first, trace_id), "the run to be stored")
        first.kill9()

    with serving(tmp_path, trace_idle="300ms") as second:
        runs = second.wait_for(
            lambda: [r for r in runs_of(second, trace_id) if r["status"] == "failed"],
            "a verdict")
        assert len(runs) == 1
        assert runs_of(second, trace_id) == runs
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


def test_decode_workers_default_to_one_per_cpu_beyond_the_first(capsys):
    from outcomewatch.receiver.decode_pool import auto_workers

    assert build_parser().parse_args(["serve"]).decode_workers == auto_workers()
    assert build_parser().parse_args(["serve", "--decode-workers", "0"]).decode_workers == 0
    try:
        build_parser().parse_args(["serve", "--decode-workers", "many"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--decode-workers many was accepted")
    assert "expected 'auto' or a number of workers, got 'many'" in capsys.readouterr().err
