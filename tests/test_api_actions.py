"""Incident actions over HTTP: acknowledge, resolve, reopen. The IncidentActions given to the app
runs the real store.incidents.act in a transaction on a real DuckDB file, so the timeline and
outbox rows checked here are the ones the lifecycle SQL writes."""

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
from outcomewatch.api.deps import IncidentActions
from outcomewatch.store.queries import Reader
from outcomewatch.store.schema import DDL
from tests.api_support import SqlActions

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=2)
NOW_ISO = "2024-05-01T14:00:00Z"
TARGETS = {"pager": ("alertmanager", "webhook"), "quiet": ()}
OPEN, ACKNOWLEDGED, RESOLVED, QUIET = 1, 2, 3, 4


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(str(tmp_path / "outcomewatch.duckdb"))
    connection.execute("SET GLOBAL TimeZone = 'Asia/Kolkata'")
    connection.execute(DDL)
    connection.executemany(
        "INSERT INTO incidents (id, rule, status, severity, owner, route, opened_at,"
        " last_failure_at, failure_count, summary, resolved_at) VALUES"
        " (?, 'checkout', ?, 'critical', 'team-pay', ?, ?, ?, 1, 'checkout failed', ?)",
        [(OPEN, "open", "pager", T0, T0, None),
         (ACKNOWLEDGED, "acknowledged", "pager", T0, T0, None),
         (RESOLVED, "resolved", "pager", T0, T0, T0 + timedelta(hours=1)),
         (QUIET, "open", "quiet", T0, T0, None)],
    )
    connection.execute(
        "INSERT INTO incident_events VALUES (?, ?, 'opened', 'outcomewatch', 'checkout failed')",
        [OPEN, T0],
    )
    yield connection
    connection.close()


def app_client(conn: duckdb.DuckDBPyConnection, **options: Any) -> TestClient:
    actions: IncidentActions = SqlActions(conn, at=NOW, targets_for_route=TARGETS)
    return TestClient(create_app(Reader(conn), actions=actions, **options))


@pytest.fixture
def client(conn: duckdb.DuckDBPyConnection) -> TestClient:
    return app_client(conn)


def post_ok(client: TestClient, url: str, body: dict[str, Any] | None = None) -> Any:
    response = client.post(url, json=body) if body is not None else client.post(url)
    assert response.status_code == 200, response.text
    return response.json()


def outbox(conn: duckdb.DuckDBPyConnection, incident_id: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT transition, target, route, status, payload FROM outbox WHERE incident_id = ?"
        " ORDER BY id", [incident_id]).fetchall()


def events(conn: duckdb.DuckDBPyConnection, incident_id: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT kind, actor, comment FROM incident_events WHERE incident_id = ?"
        " ORDER BY occurred_at, rowid", [incident_id]).fetchall()


def test_acknowledging_an_open_incident_answers_the_updated_incident(client: TestClient) -> None:
    body = post_ok(client, f"/api/v1/incidents/{OPEN}/acknowledge",
                   {"actor": "alice", "comment": "looking"})
    assert (body["id"], body["status"], body["acknowledged_at"]) == (OPEN, "acknowledged", NOW_ISO)
    assert body["timeline"] == [
        {"at": "2024-05-01T12:00:00Z", "kind": "opened", "actor": "outcomewatch",
         "comment": "checkout failed"},
        {"at": NOW_ISO, "kind": "acknowledged", "actor": "alice", "comment": "looking"},
    ]


def test_an_action_answers_the_same_body_as_a_get_of_the_incident(client: TestClient) -> None:
    posted = post_ok(client, f"/api/v1/incidents/{OPEN}/acknowledge")
    assert posted == client.get(f"/api/v1/incidents/{OPEN}").json()


def test_acknowledging_writes_the_timeline_row_and_one_outbox_row_per_target(
    client: TestClient, conn: duckdb.DuckDBPyConnection
) -> None:
    post_ok(client, f"/api/v1/incidents/{OPEN}/acknowledge", {"actor": "alice",
                                                               "comment": "looking"})
    assert events(conn, OPEN)[-1] == ("acknowledged", "alice", "looking")
    rows = outbox(conn, OPEN)
    assert [row[:4] for row in rows] == [("acknowledged", "alertmanager", "pager", "pending"),
                                         ("acknowledged", "webhook", "pager", "pending")]
    payload = json.loads(rows[0][4])
    assert (payload["status"], payload["actor"], payload["comment"]) == (
        "acknowledged", "alice", "looking")


def test_resolving_an_acknowledged_incident_sets_resolved_at(
    client: TestClient, conn: duckdb.DuckDBPyConnection
) -> None:
    body = post_ok(client, f"/api/v1/incidents/{ACKNOWLEDGED}/resolve", {"comment": "fixed"})
    assert (body["status"], body["resolved_at"]) == ("resolved", NOW_ISO)
    assert body["timeline"] == [
        {"at": NOW_ISO, "kind": "resolved", "actor": "api", "comment": "fixed"}]
    assert [row[:2] for row in outbox(conn, ACKNOWLEDGED)] == [
        ("resolved", "alertmanager"), ("resolved", "webhook")]


def test_resolving_an_open_incident_is_allowed(client: TestClient) -> None:
    assert post_ok(client, f"/api/v1/incidents/{OPEN}/resolve")["status"] == "resolved"


def test_reopening_a_resolved_incident_clears_resolved_at(
    client: TestClient, conn: duckdb.DuckDBPyConnection
) -> None:
    body = post_ok(client, f"/api/v1/incidents/{RESOLVED}/reopen", {"actor": "bob"})
    assert (body["status"], body["resolved_at"], body["acknowledged_at"]) == ("open", None, None)
    assert events(conn, RESOLVED) == [("reopened", "bob", None)]
    assert [row[:2] for row in outbox(conn, RESOLVED)] == [
        ("reopened", "alertmanager"), ("reopened", "webhook")]


def test_an_action_without_a_body_is_attributed_to_the_api(
    client: TestClient, conn: duckdb.DuckDBPyConnection
) -> None:
    post_ok(client, f"/api/v1/incidents/{OPEN}/acknowledge")
    assert events(conn, OPEN)[-1] == ("acknowledged", "api", None)


def test_an_action_on_a_route_without_targets_writes_no_outbox_row(
    client: TestClient, conn: duckdb.DuckDBPyConnection
) -> None:
    post_ok(client, f"/api/v1/incidents/{QUIET}/acknowledge")
    assert events(conn, QUIET) == [("acknowledged", "api", None)]
    assert outbox(conn, QUIET) == []


@pytest.mark.parametrize(
    ("incident_id", "action", "message"),
    [
        (RESOLVED, "acknowledge", "incident 3 is resolved; acknowledge applies to: open"),
        (ACKNOWLEDGED, "acknowledge", "incident 2 is acknowledged; acknowledge applies to: open"),
        (RESOLVED, "resolve", "incident 3 is resolved; resolve applies to: open, acknowledged"),
        (OPEN, "reopen", "incident 1 is open; reopen applies to: resolved"),
    ],
)
def test_an_action_that_does_not_apply_is_409_and_writes_nothing(
    client: TestClient, conn: duckdb.DuckDBPyConnection, incident_id: int, action: str,
    message: str,
) -> None:
    before = events(conn, incident_id)
    response = client.post(f"/api/v1/incidents/{incident_id}/{action}")
    assert (response.status_code, response.json()) == (409, {"detail": message})
    assert events(conn, incident_id) == before
    assert outbox(conn, incident_id) == []


@pytest.mark.parametrize("action", ["acknowledge", "resolve", "reopen"])
def test_an_action_on_an_unknown_incident_is_404(client: TestClient, action: str) -> None:
    response = client.post(f"/api/v1/incidents/7/{action}")
    assert (response.status_code, response.json()) == (404, {"detail": "incident 7 not found"})


def test_actions_are_503_on_a_read_only_deployment(conn: duckdb.DuckDBPyConnection) -> None:
    response = TestClient(create_app(Reader(conn))).post(f"/api/v1/incidents/{OPEN}/resolve")
    assert response.status_code == 503
    assert conn.execute("SELECT status FROM incidents WHERE id = ?", [OPEN]).fetchone() == (
        "open",)


@pytest.mark.parametrize(
    "body",
    [{"actor": ""}, {"comment": "x" * 4001}, {"actor": 5}, {"coment": "typo"}, [1]],
)
def test_an_out_of_contract_body_is_422(client: TestClient, body: Any) -> None:
    assert client.post(f"/api/v1/incidents/{OPEN}/acknowledge", json=body).status_code == 422


def test_a_body_of_json_null_is_the_same_as_no_body(
    client: TestClient, conn: duckdb.DuckDBPyConnection
) -> None:
    response = client.post(f"/api/v1/incidents/{OPEN}/acknowledge", content=b"null",
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert events(conn, OPEN)[-1] == ("acknowledged", "api", None)
