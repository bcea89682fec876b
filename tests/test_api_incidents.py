"""What an incident shows beyond its row: group, description, timeline, late outcomes, offending
spans and scheduled runs. Rows are inserted with SQL; late outcomes by the real
verdict writer (store.verdicts.write)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from fastapi.testclient import TestClient

from outcomewatch.api import create_app
from outcomewatch.model import LateOutcome
from outcomewatch.store import verdicts
from outcomewatch.store.queries import Reader
from outcomewatch.store.schema import DDL
from tests.api_support import get_ok

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
GROUPED, UNGROUPED, ODD = 1, 2, 3
TRACE = "0af7651916cd43dd8448eb211c80319c"


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


OFFENDING = {
    "name": "email.send", "service": "mailer", "span_id": "00f067aa0ba902b7", "kind": "client",
    "status": "error", "status_message": "bounced", "duration_ms": 3.5, "trace_id": TRACE,
    "attributes": {"email.to": "a@example.com", "attempt": 2},
    "exceptions": [{"type": "Bounce", "message": None, "stacktrace": None}],
}
# (run_id, incident_id, failed_at, detail)
FAILURES = [
    ("run-a", GROUPED, minutes(5), {"offending": [OFFENDING, "not a span"]}),
    ("run-b", GROUPED, minutes(10), {"scheduled_at": "2024-05-01T02:00:00+00:00",
                                     "trigger": {}, "span_count": 0, "offending": []}),
    ("run-c", GROUPED, minutes(15), {}),
    ("run-d", ODD, minutes(1), {"scheduled_at": "yesterday", "offending": {"not": "a list"}}),
]


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(str(tmp_path / "outcomewatch.duckdb"))
    connection.execute("SET GLOBAL TimeZone = 'Asia/Kolkata'")
    connection.execute(DDL)
    connection.executemany(
        "INSERT INTO incidents (id, rule, status, severity, owner, route, opened_at,"
        " last_failure_at, failure_count, summary, description, group_key, acknowledged_at,"
        " resolved_at) VALUES (?, 'provision', ?, 'warning', 'team-infra', 'pager', ?, ?, 3,"
        " 'tenant not ready', ?, ?, ?, ?)",
        [(GROUPED, "acknowledged", T0, minutes(15), "Every signup gets a tenant.",
          json.dumps({"customer": "acme", "region": "eu"}, sort_keys=True), minutes(7), None),
         (UNGROUPED, "resolved", T0, minutes(2), "", "", None, minutes(3)),
         (ODD, "open", T0, minutes(1), "", "not json", None, None)],
    )
    for run_id, incident_id, failed_at, detail in FAILURES:
        connection.execute(
            "INSERT INTO runs (id, rule, trace_id, trigger_span_id, status, opened_at, closed_at,"
            " reason, missing, incident_id, group_key) VALUES (?, 'provision', ?, '', 'failed',"
            " ?, ?, 'deadline', ['tenant.ready'], ?, '')",
            [run_id, TRACE, failed_at - timedelta(minutes=1), failed_at, incident_id])
        connection.execute(
            "INSERT INTO incident_failures (incident_id, run_id, rule, trace_id, failed_at,"
            " reason, missing, detail) VALUES (?, ?, 'provision', ?, ?, 'deadline',"
            " ['tenant.ready'], ?)",
            [incident_id, run_id, TRACE, failed_at, json.dumps(detail)])
    connection.executemany(
        "INSERT INTO incident_events VALUES (?, ?, ?, ?, ?)",
        [(GROUPED, T0, "opened", "outcomewatch", "tenant not ready"),
         (GROUPED, minutes(7), "acknowledged", "alice", None),
         # Two events at one instant: the timeline keeps their insertion order.
         (GROUPED, minutes(8), "resolved", "alice", "fixed"),
         (GROUPED, minutes(8), "reopened", "outcomewatch", "failed again")],
    )
    verdicts.write(connection, verdicts.VerdictBatch(
        [LateOutcome("run-a", "provision", TRACE, "tenant.ready", minutes(20))]))
    yield connection
    connection.close()


@pytest.fixture
def client(conn: duckdb.DuckDBPyConnection) -> TestClient:
    return TestClient(create_app(Reader(conn)))


def failure(client: TestClient, run_id: str, incident_id: int = GROUPED) -> Any:
    failures = get_ok(client, f"/api/v1/incidents/{incident_id}")["failures"]
    return next(f for f in failures if f["run_id"] == run_id)


def test_a_late_outcome_is_shown_on_its_failure_which_still_stands(client: TestClient) -> None:
    late = failure(client, "run-a")
    assert (late["late_outcomes"], late["late_at"]) == (["tenant.ready"], "2024-05-01T12:20:00Z")
    assert (late["reason"], late["missing"]) == ("deadline", ["tenant.ready"])
    assert failure(client, "run-c")["late_outcomes"] == []


def test_a_late_outcome_is_the_last_event_of_the_timeline(client: TestClient) -> None:
    timeline = get_ok(client, f"/api/v1/incidents/{GROUPED}")["timeline"]
    assert timeline[-1] == {"at": "2024-05-01T12:20:00Z", "kind": "late_outcome",
                            "actor": "outcomewatch",
                            "comment": "tenant.ready arrived after run run-a failed"}


def test_the_timeline_is_oldest_first_with_ties_in_insertion_order(client: TestClient) -> None:
    timeline = get_ok(client, f"/api/v1/incidents/{GROUPED}")["timeline"]
    assert [(e["kind"], e["actor"]) for e in timeline] == [
        ("opened", "outcomewatch"), ("acknowledged", "alice"), ("resolved", "alice"),
        ("reopened", "outcomewatch"), ("late_outcome", "outcomewatch")]


def test_a_run_lists_its_late_outcomes_and_its_incident(client: TestClient) -> None:
    runs = get_ok(client, "/api/v1/runs", rule="provision")["runs"]
    run_a = next(r for r in runs if r["id"] == "run-a")
    assert (run_a["late_outcomes"], run_a["late_at"], run_a["incident_id"]) == (
        ["tenant.ready"], "2024-05-01T12:20:00Z", GROUPED)


def test_the_group_is_parsed_from_the_group_key(client: TestClient) -> None:
    group = {"customer": "acme", "region": "eu"}
    assert get_ok(client, f"/api/v1/incidents/{GROUPED}")["group"] == group
    listed = get_ok(client, "/api/v1/incidents", status="acknowledged")["incidents"]
    assert [i["group"] for i in listed] == [group]


@pytest.mark.parametrize("incident_id", [UNGROUPED, ODD])
def test_an_ungrouped_or_unreadable_group_key_is_an_empty_group(client: TestClient,
                                                                 incident_id: int) -> None:
    assert get_ok(client, f"/api/v1/incidents/{incident_id}")["group"] == {}


def test_an_incident_shows_its_description_and_transition_times(client: TestClient) -> None:
    grouped = get_ok(client, f"/api/v1/incidents/{GROUPED}")
    assert (grouped["description"], grouped["acknowledged_at"], grouped["resolved_at"]) == (
        "Every signup gets a tenant.", "2024-05-01T12:07:00Z", None)
    resolved = get_ok(client, "/api/v1/incidents", status="resolved")["incidents"][0]
    assert (resolved["acknowledged_at"], resolved["resolved_at"]) == (
        None, "2024-05-01T12:03:00Z")


def test_the_failures_parameter_returns_the_newest_n(client: TestClient) -> None:
    failures = get_ok(client, f"/api/v1/incidents/{GROUPED}", failures=2)["failures"]
    assert [f["run_id"] for f in failures] == ["run-c", "run-b"]


@pytest.mark.parametrize("failures", ["0", "201", "many"])
def test_an_out_of_range_failures_parameter_is_422(client: TestClient, failures: str) -> None:
    response = client.get(f"/api/v1/incidents/{GROUPED}", params={"failures": failures})
    assert response.status_code == 422


def test_offending_spans_are_read_from_the_detail(client: TestClient) -> None:
    offending = failure(client, "run-a")["offending"]
    assert offending == [{
        **OFFENDING, "exceptions": [{"type": "Bounce", "message": "", "stacktrace": ""}]}]


def test_a_scheduled_run_that_never_started_shows_when_it_was_due(client: TestClient) -> None:
    scheduled = failure(client, "run-b")
    assert (scheduled["scheduled_at"], scheduled["offending"], scheduled["trigger"]) == (
        "2024-05-01T02:00:00Z", [], {})


def test_a_detail_without_the_new_keys_reads_as_empty(client: TestClient) -> None:
    sparse = failure(client, "run-c")
    assert (sparse["offending"], sparse["scheduled_at"], sparse["late_at"]) == ([], None, None)


def test_mistyped_offending_and_scheduled_at_read_as_empty(client: TestClient) -> None:
    odd = failure(client, "run-d", incident_id=ODD)
    assert (odd["offending"], odd["scheduled_at"]) == ([], None)
