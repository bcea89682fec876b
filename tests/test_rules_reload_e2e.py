"""Rules kept in git, reloaded while the server runs: on a file change, on POST
/api/v1/rules/reload, on SIGHUP; an invalid set is rejected and the old one keeps running."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from opentelemetry.trace import Status, StatusCode

from tests.harness import RunningServer, running_server, trace_id_of
from tests.processes import serving

ONE_RULE = """
rules:
  - name: signup-welcomed
    owner: growth
    trigger: {span: signup.completed}
    expect: [{span: welcome.sent}]
"""
TWO_RULES = ONE_RULE + """
  - name: invite-accepted
    owner: growth
    trigger: {span: invite.sent}
    expect: [{span: invite.accepted}]
"""


def rule_names(server: RunningServer) -> list[str]:
    return [r["name"] for r in server.get("/api/v1/rules")["rules"]]


def signup(server: RunningServer, *, welcomed: bool) -> str:
    tracer = server.tracer("grpc", **{"service.name": "accounts"})
    with tracer.start_as_current_span("signup.completed") as span:
        if welcomed:
            with tracer.start_as_current_span("welcome.sent") as welcome:
                welcome.set_status(Status(StatusCode.OK))
    return trace_id_of(span)


def test_the_rules_endpoint_lists_rules_with_their_source_and_run_statistics(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(ONE_RULE)
    with running_server(tmp_path, rules=[rules]) as server:
        server.verdict(signup(server, welcomed=True), "signup-welcomed")
        server.verdict(signup(server, welcomed=True), "signup-welcomed")

        (rule,) = server.get("/api/v1/rules")["rules"]
        assert (rule["name"], rule["source"], rule["line"]) == ("signup-welcomed", str(rules), 3)
        assert (rule["trigger"], rule["expect"]) == ("signup.completed", ["welcome.sent"])
        assert (rule["runs_passed"], rule["runs_failed"], rule["runs_open"]) == (2, 0, 0)
        assert rule["time_to_outcome_p50_s"] is not None
        assert rule["time_to_outcome_p95_s"] >= rule["time_to_outcome_p50_s"]


def test_a_changed_rule_file_is_reloaded_and_its_new_rule_judges_new_spans(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(ONE_RULE)
    with running_server(tmp_path, rules=[rules]) as server:
        rules.write_text(TWO_RULES)
        server.wait_for(lambda: len(rule_names(server)) == 2, what="the reload")

        tracer = server.tracer("grpc", **{"service.name": "accounts"})
        with tracer.start_as_current_span("invite.sent") as invite:
            tracer.start_span("invite.accepted").end()
        assert server.verdict(trace_id_of(invite), "invite-accepted")["status"] == "passed"


def test_an_invalid_rule_set_is_rejected_with_its_errors_and_the_old_rules_keep_running(
    tmp_path,
):
    rules = tmp_path / "rules.yaml"
    rules.write_text(ONE_RULE)
    with running_server(tmp_path, rules=[rules]) as server:
        rules.write_text(ONE_RULE.replace("expect:", "expcet:"))
        response = server.api.post("/api/v1/rules/reload")

        assert response.status_code == 422
        body: dict[str, Any] = response.json()
        assert body["status"] == "rejected"
        (problem,) = body["problems"]
        assert (problem["file"], problem["line"]) == (str(rules), 6)
        assert "did you mean 'expect'" in problem["message"]
        assert rule_names(server) == ["signup-welcomed"]
        assert server.verdict(signup(server, welcomed=True), "signup-welcomed")["status"] == (
            "passed")


def test_a_valid_reload_through_the_api_answers_with_the_rule_count(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(ONE_RULE)
    with running_server(tmp_path, rules=[rules]) as server:
        rules.write_text(TWO_RULES)
        response = server.api.post("/api/v1/rules/reload")
        assert response.status_code == 200
        assert (response.json()["status"], response.json()["rules"]) == ("reloaded", 2)


def test_sighup_reloads_the_rules_of_a_running_process(tmp_path: Path) -> None:
    with serving(tmp_path, trace_idle="10s") as process:
        rules = tmp_path / "rules.yaml"
        before = rules.stat()
        # The same size and modification time: the file watcher cannot notice, only SIGHUP.
        rules.write_text(rules.read_text().replace("signup-welcomed", "signup-greeted_"))
        os.utime(rules, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert rules.stat().st_size == before.st_size

        process.popen.send_signal(signal.SIGHUP)
        names = process.wait_for(lambda: [
            r["name"] for r in process.client.get("/api/v1/rules").json()["rules"]
            if r["name"] == "signup-greeted_"], "the reload")
        assert names == ["signup-greeted_"]
