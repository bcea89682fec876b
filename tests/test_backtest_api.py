"""POST /api/v1/replay: a backtest inside the running server, on its own stored spans, while it
ingests; `outcomewatch replay --api` uses it; `replay --db` on a file refuses what it cannot
read faithfully."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from outcomewatch import cli
from outcomewatch.offline.replay import replay, report_json
from outcomewatch.rules import load_rules
from tests.harness import RunningServer, running_server

RULES = """
rules:
  - name: order-confirmed
    owner: shop
    trigger: {span: order.placed}
    expect: [{span: email.sent}]
"""


def orders(server: RunningServer, *, healthy: int, broken: int) -> None:
    tracer = server.tracer("grpc", **{"service.name": "shop"})
    for n in range(healthy + broken):
        with tracer.start_as_current_span("order.placed"):
            if n < healthy:
                with tracer.start_as_current_span("email.sent"):
                    pass


def same_verdicts(answer: dict[str, Any]) -> dict[str, Any]:
    """What a backtest decided (the window and the stats depend on spans no rule reads)."""
    return {key: answer[key] for key in ("rules", "incidents", "failed_runs")}


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "backtest.yaml"
    path.write_text(RULES)
    return path


def test_a_backtest_answers_while_ingest_goes_on_and_matches_replay_of_the_file(
    tmp_path: Path, rules_file: Path
) -> None:
    db = tmp_path / "outcomewatch.duckdb"
    with running_server(tmp_path, rules=[rules_file]) as server:
        orders(server, healthy=6, broken=3)
        server.go_idle()
        server.wait_for(lambda: len(server.runs(status="failed")) == 3, what="3 failures")

        acknowledged: list[int] = []
        stop = threading.Event()

        def ingest() -> None:  # spans no rule looks at, in traces of their own
            tracer = server.tracer("http", **{"service.name": "noise"})
            while not stop.is_set():
                with tracer.start_as_current_span("unrelated.work"):
                    pass
                acknowledged.append(1)

        sender = threading.Thread(target=ingest)
        sender.start()
        try:
            server.wait_for(lambda: len(acknowledged) >= 5, what="ingest under way")
            response = server.api.post("/api/v1/replay", content=RULES,
                                       headers={"Content-Type": "application/yaml"})
            during = len(acknowledged)
            server.wait_for(lambda: len(acknowledged) > during + 5,
                            what="ingest acknowledging after the backtest")
        finally:
            stop.set()
            sender.join(timeout=30)
        assert response.status_code == 200, response.text
        answer = response.json()
    # The server stopped cleanly: its file is complete.
    offline = report_json(replay(load_rules([rules_file]), str(db)))
    assert same_verdicts(answer) == same_verdicts(offline)
    assert answer["rules"][0]["failed"] == 3 and answer["rules"][0]["passed"] == 6


def test_invalid_rules_are_answered_422_with_their_place(tmp_path: Path, rules_file: Path) -> None:
    with running_server(tmp_path, rules=[rules_file]) as server:
        response = server.api.post("/api/v1/replay", content="rules:\n  - name: x\n    owner: 1\n",
                                   headers={"Content-Type": "application/yaml"})
    assert response.status_code == 422
    [first, *_] = response.json()["problems"]
    assert first["file"] == "request.yaml" and first["line"] >= 2


def test_cli_replay_through_the_api_prints_the_report(
    tmp_path: Path, rules_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_server(tmp_path, rules=[rules_file]) as server:
        orders(server, healthy=2, broken=1)
        server.go_idle()
        server.wait_for(lambda: server.runs(status="failed"), what="the failure")
        code = cli.main(["replay", "--rules", str(rules_file), "--api",
                         f"http://127.0.0.1:{server.server.api_port}", "--format", "json"])
    out = capsys.readouterr().out
    assert code == 0
    assert '"failed": 1' in out and '"passed": 2' in out


def test_replay_refuses_a_file_a_running_server_holds_and_a_copy_without_its_wal(
    tmp_path: Path, rules_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy.duckdb"
    with running_server(tmp_path, rules=[rules_file]) as server:
        orders(server, healthy=1, broken=0)
        server.wait_for(lambda: server.runs(), what="a run")
        shutil.copy(tmp_path / "outcomewatch.duckdb", copy)  # the .wal stays behind
    code = cli.main(["replay", "--rules", str(rules_file), "--db", str(copy)])
    assert code == 1
    err = capsys.readouterr().err
    assert "without copy.duckdb.wal" in err and "--api" in err


def test_the_servers_suggestions_carry_their_backtest(tmp_path: Path, rules_file: Path) -> None:
    with running_server(tmp_path, rules=[rules_file]) as server:
        orders(server, healthy=8, broken=2)
        server.go_idle()
        server.wait_for(lambda: len(server.runs(status="failed")) == 2, what="2 failures")
        answer = server.get("/api/v1/suggestions", min_traces=5, trigger="order.placed")
    [proposal] = answer["suggestions"]
    assert proposal["backtest"] is not None
    assert proposal["backtest"]["runs"] == 10
