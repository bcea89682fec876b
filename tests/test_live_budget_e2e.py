"""The live-state byte budget from the command line: ``--max-live-bytes`` and its default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from outcomewatch.cli_args import MIN_LIVE_BYTES, default_live_bytes, memory_limit_bytes, parse_size
from tests.processes import make_request, make_span, serving


def test_a_server_over_its_byte_budget_evaluates_the_oldest_traces_early(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, trace_idle="1h", args=["--max-live-bytes", "64KiB"]) as server:
        traces = [os.urandom(16) for _ in range(200)]
        for first in range(0, len(traces), 20):
            body = make_request([make_span(t, "signup.completed")
                                 for t in traces[first:first + 20]])
            assert _send(server.grpc_endpoint, body) == grpc.StatusCode.OK
        # Evictions are decided as the exports are observed: 5 s bounds only a broken run (and
        # the wait while the flag is not yet wired).
        evicted = server.wait_for(lambda: server.runs(status="failed"), "evicted runs", 5)
        assert {run["reason"] for run in evicted} == {"evicted"}
        assert {run["trace_id"] for run in evicted} <= {t.hex() for t in traces[:180]}
        metrics = server.client.get("/metrics").text
        assert "outcomewatch_evicted_traces_total 0.0" not in metrics
        open_runs = server.runs(status="open")
        assert 0 < len(open_runs) < 100  # ~1.6 KB each by the estimate: about 40 fit in 64 KiB
        assert server.client.get("/readyz").status_code == 200


def _send(endpoint: str, body: bytes) -> grpc.StatusCode:
    with grpc.insecure_channel(endpoint) as channel:
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=None, response_deserializer=None)
        try:
            export(body, timeout=30)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def test_a_size_that_is_not_one_is_refused_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "outcomewatch", "serve", "--max-live-bytes", "lots",
         "--db", str(tmp_path / "ow.duckdb")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(
        "argument --max-live-bytes: invalid size 'lots': expected bytes, like 512MiB or 2GB")
    assert "Traceback" not in done.stderr


def test_the_help_names_the_flag_and_its_default() -> None:
    done = subprocess.run([sys.executable, "-m", "outcomewatch", "serve", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert "--max-live-bytes SIZE" in done.stdout
    assert "a quarter of the machine's" in " ".join(done.stdout.split())


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5gib", 3 * 2**29), ("4096", 4096),
     ("64 KiB", 65536), ("10kb", 10_000)],
)
def test_sizes_are_read_in_decimal_or_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "0", "-5MiB", "1.5XB", "", "MiB"])
def test_what_is_not_a_positive_size_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected bytes, like 512MiB or 2GB"):
        parse_size(text)


def test_the_default_is_a_quarter_of_the_cgroup_limit_when_it_is_lower(tmp_path: Path) -> None:
    machine = memory_limit_bytes(tmp_path)  # no cgroup files there: the machine's memory
    (tmp_path / "memory.max").write_text(f"{machine // 2}\n")
    assert default_live_bytes(tmp_path) == machine // 8
    (tmp_path / "memory.max").write_text("max\n")
    assert default_live_bytes(tmp_path) == machine // 4


def test_the_default_is_never_below_its_floor(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("100000000\n")  # a 100 MB box
    assert default_live_bytes(tmp_path) == MIN_LIVE_BYTES
