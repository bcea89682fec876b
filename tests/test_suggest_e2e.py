"""The issue's acceptance case for ``outcomewatch suggest``: two workflows sent through the real
server with the official OTLP exporter (checkout healthy 95% of the time, the report missing its
delivery in 30% of traces); the real command proposes both rules with the observed shares, its
YAML passes ``check``, and its backtest's failure counts equal what the server judges when the
same traffic is sent again with those rules loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from opentelemetry.trace import Status, StatusCode, Tracer

from outcomewatch.durations import parse_duration
from tests.harness import TRACE_IDLE, RunningServer, running_server

TRACES = 40
CHECKOUT_BAD = {0, 20}  # 2 of 40: receipt.sent ends in error (healthy 95% of the time)
REPORT_MISSING = {i for i in range(TRACES) if i % 10 < 3}  # 12 of 40: never delivered


def send_traffic(tracer: Tracer) -> None:
    for i in range(TRACES):
        with tracer.start_as_current_span("checkout.submit"):
            with tracer.start_as_current_span("payment.charge") as charge:
                charge.set_status(Status(StatusCode.OK))
            with tracer.start_as_current_span("receipt.sent") as receipt:
                receipt.set_status(Status(StatusCode.ERROR if i in CHECKOUT_BAD else StatusCode.OK))
        with tracer.start_as_current_span("report.generate"):
            with tracer.start_as_current_span("report.rendered"):
                pass
            if i not in REPORT_MISSING:
                with tracer.start_as_current_span("report.delivered"):
                    pass


def outcomewatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "outcomewatch", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def by_trigger(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["rule"]["trigger"]["span"]: s for s in report["suggestions"]}


def failed_runs(server: RunningServer, rule: str) -> int:
    def all_closed() -> list[dict[str, Any]] | None:
        runs = server.runs(rule=rule, limit=1000)
        done = [r for r in runs if r["status"] != "open"]
        return runs if len(runs) == TRACES and len(done) == TRACES else None

    runs: list[dict[str, Any]] = server.wait_for(all_closed, what=f"{TRACES} verdicts of {rule}")
    return sum(r["status"] == "failed" for r in runs)


def test_suggest_proposes_both_workflows_and_its_backtest_matches_the_server(
    tmp_path: Path,
) -> None:
    first = tmp_path / "first"
    first.mkdir()
    with running_server(first) as server:
        send_traffic(server.tracer("grpc", **{"service.name": "shop"}))
    db = str(first / "outcomewatch.duckdb")

    answer = outcomewatch("suggest", "--db", db, "--format", "json", "--min-traces", "20")
    assert answer.returncode == 0, answer.stderr
    proposals = by_trigger(json.loads(answer.stdout))
    assert set(proposals) == {"checkout.submit", "report.generate"}

    checkout = proposals["checkout.submit"]
    assert checkout["observed"]["traces"] == TRACES
    outcomes = {o["span"]: o for o in checkout["observed"]["outcomes"]}
    assert outcomes["receipt.sent"]["missing_share"] == 0.0
    assert outcomes["receipt.sent"]["failing_share"] == 0.05
    assert outcomes["receipt.sent"]["status"] == {"ok": 38, "error": 2, "unset": 0}
    assert {"span": "receipt.sent", "service": "shop", "status": "ok"} in checkout["rule"]["expect"]
    report = proposals["report.generate"]
    outcomes = {o["span"]: o for o in report["observed"]["outcomes"]}
    assert outcomes["report.delivered"]["missing_share"] == 0.3
    assert outcomes["report.rendered"]["missing_share"] == 0.0
    assert {"span": "report.delivered", "service": "shop"} in report["rule"]["expect"]
    assert checkout["backtest"]["runs"] == report["backtest"]["runs"] == TRACES
    assert checkout["backtest"]["failed"] == len(CHECKOUT_BAD)
    assert report["backtest"]["failed"] == len(REPORT_MISSING)

    as_yaml = outcomewatch("suggest", "--db", db, "--format", "yaml", "--min-traces", "20")
    assert as_yaml.returncode == 0, as_yaml.stderr
    rules = tmp_path / "suggested.yaml"
    rules.write_text(as_yaml.stdout)
    checked = outcomewatch("check", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    second = tmp_path / "second"
    second.mkdir()
    with running_server(second, rules=[rules]) as server:
        send_traffic(server.tracer("grpc", **{"service.name": "shop"}))
        # The proposed deadlines, then the idle time: every run is decided.
        server.advance(max(_within(p) for p in proposals.values()) + TRACE_IDLE * 2)
        judged = {t: failed_runs(server, p["rule"]["name"]) for t, p in proposals.items()}
    assert judged == {t: p["backtest"]["failed"] for t, p in proposals.items()}


def _within(proposal: dict[str, Any]) -> timedelta:
    return parse_duration(proposal["rule"]["within"])


def test_suggest_on_a_file_a_running_server_holds_says_to_ask_the_server(
    tmp_path: Path,
) -> None:
    with running_server(tmp_path):
        done = outcomewatch("suggest", "--db", str(tmp_path / "outcomewatch.duckdb"))
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"outcomewatch: cannot open database {tmp_path}/outcomewatch.duckdb")
    assert line.endswith("a running server holds it: ask the server instead (suggest --api URL)")
