"""``outcomewatch demo``: the rules copy on a short clock, and the command itself as a user runs
it (a separate process on free ports, stopped with Ctrl-C)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from datetime import timedelta

import httpx

from outcomewatch.demo import prepare_rules, run, scale_within
from outcomewatch.rules import load_rules
from tests.harness import EXAMPLE_RULES
from tests.processes import wait_for

URL = re.compile(r"open (http://127\.0\.0\.1:\d+/)")


def test_a_minute_of_within_becomes_a_second_between_three_and_twenty_seconds():
    assert scale_within(timedelta(minutes=10)) == timedelta(seconds=10)
    assert scale_within(timedelta(minutes=1)) == timedelta(seconds=3)
    assert scale_within(timedelta(hours=2)) == timedelta(seconds=20)


def test_the_demo_rules_are_the_examples_with_every_within_scaled(tmp_path):
    copied = prepare_rules(EXAMPLE_RULES, tmp_path / "rules")

    assert not list(copied.glob("*.test.yaml"))
    original = {r.name: r for r in load_rules([EXAMPLE_RULES]).rules}
    demo = {r.name: r for r in load_rules([copied]).rules}
    assert demo.keys() == original.keys()
    for name, rule in demo.items():
        before = original[name].within
        assert rule.within == (scale_within(before) if before else None), name
    text = (copied / "01-payment-failed-access.yaml").read_text()
    assert text.startswith("# Story:")  # the comments stay: the copy still explains itself


def test_the_demo_command_fills_the_console_and_stops_on_ctrl_c(tmp_path):
    out = tmp_path / "demo.out"
    with out.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "outcomewatch", "demo", "--db", str(tmp_path / "d.duckdb"),
             "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--api", "127.0.0.1:0",
             "--rules", str(EXAMPLE_RULES), "--every", "1h"],
            stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        url = wait_for(lambda: (lambda m: m and m[1])(URL.search(out.read_text())),
                       "the URL to open")
        assert url
        with httpx.Client(base_url=url, timeout=10) as api:
            def filled() -> bool:
                rules = {i["rule"] for i in api.get("/api/v1/incidents").json()["incidents"]}
                passed = api.get("/api/v1/runs", params={"status": "passed"}).json()["runs"]
                return len(rules) >= 5 and len(passed) >= 5
            wait_for(filled, "incidents and passing runs")
            assert api.get("/").status_code == 200
        assert "round 1: 13 traces sent" in out.read_text()
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    assert code == 0, out.read_text()
    assert (tmp_path / "demo-rules" / "05-backup-restore-proven.yaml").exists()


class FakeServer:
    """The two calls and two ports run() needs; the real server is in the test above."""

    grpc_port = 1
    api_port = 2

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")

    async def stop(self) -> None:
        self.calls.append("stop")


def test_stopping_does_not_wait_for_a_round_the_exporter_is_still_retrying():
    import asyncio
    import io
    import threading

    started, release = threading.Event(), threading.Event()

    def stuck(endpoint: str, n: int) -> int:  # as when the server answers UNAVAILABLE
        started.set()
        release.wait(timeout=60)
        return 0

    async def scenario(server: FakeServer) -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(run(
            server, api_host="127.0.0.1", grpc_host="127.0.0.1", out=io.StringIO(),
            every=timedelta(hours=1), play=stuck, stop=stop))
        await asyncio.to_thread(started.wait, 10)
        stop.set()
        await asyncio.wait_for(running, 10)

    server = FakeServer()
    try:
        asyncio.run(scenario(server))
    finally:
        release.set()
    assert server.calls == ["start", "stop"]
