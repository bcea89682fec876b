"""The rough edges found when outcomewatch was tried as a new user would, each checked through
the real command: a port in use, --version, a bare number as a duration, and durations in
summaries printed as written."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from outcomewatch import __version__
from tests.harness import EXAMPLE_RULES, running_server, trace_id_of


def outcomewatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "outcomewatch", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another program is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize(("flag", "label"), [
    ("--grpc", "OTLP/gRPC"), ("--http", "OTLP/HTTP"), ("--api", "API")])
def test_a_port_in_use_is_one_line_naming_the_listener_and_address(
    tmp_path: Path, taken_port: int, flag: str, label: str
) -> None:
    addresses = {f: f"127.0.0.1:{free_port()}" for f in ("--grpc", "--http", "--api")}
    addresses[flag] = f"127.0.0.1:{taken_port}"

    done = outcomewatch("serve", "--rules", str(EXAMPLE_RULES), "--db",
                        str(tmp_path / "ow.duckdb"),
                        *[part for pair in addresses.items() for part in pair])

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (f"outcomewatch: cannot listen on 127.0.0.1:{taken_port} for the "
                           f"{label} listener ({flag}): Address already in use\n")


def test_version_prints_the_version() -> None:
    done = outcomewatch("--version")
    assert (done.returncode, done.stdout) == (0, f"outcomewatch {__version__}\n")


BARE_NUMBERS = """\
rules:
  - name: a
    trigger: {span: a, duration: {gt: 2}}
    expect: [{span: b}]
    within: 600
    schedule: {cron: "0 3 * * *", grace: 90}
    reopen_within: 1.5
"""


def test_a_bare_number_is_told_how_to_write_the_duration_everywhere_one_is_read(
    tmp_path: Path
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(BARE_NUMBERS)

    done = outcomewatch("check", str(path))

    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"{path}:3:39: rules[0].trigger.duration.gt: a bare number is not a duration; write 2s",
        f"{path}:5:13: rules[0].within: a bare number is not a duration; write 600s or 10m",
        f"{path}:6:42: rules[0].schedule.grace: "
        "a bare number is not a duration; write 90s or 1m30s",
        f"{path}:7:20: rules[0].reopen_within: a bare number is not a duration; write 1500ms",
    ]


def test_a_bare_number_on_the_command_line_is_told_the_same(tmp_path: Path) -> None:
    done = outcomewatch("replay", "--rules", str(EXAMPLE_RULES), "--since", "600")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(
        "argument --since: a bare number is not a duration; write 600s or 10m")


WITHIN_RULE = """\
rules:
  - name: export-delivered
    trigger: {span: export.requested}
    expect: [{span: export.delivered}]
    within: 10m
"""


def test_a_summary_prints_the_deadline_as_written(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(WITHIN_RULE)
    with running_server(tmp_path, rules=[rules]) as server:
        with server.tracer("grpc", **{"service.name": "exports"}).start_as_current_span(
                "export.requested") as span:
            trace_id = trace_id_of(span)
        server.wait_for(lambda: server.runs(trace_id=trace_id), what="the run to open")
        server.advance(timedelta(minutes=10, seconds=1))
        assert server.verdict(trace_id, "export-delivered")["status"] == "failed"
        [incident] = server.wait_for(lambda: server.get("/api/v1/incidents")["incidents"],
                                     what="the incident")
    assert incident["summary"] == "export-delivered: export.delivered did not happen within 10m"
