"""The notification outbox listing, /readyz and /metrics, over a real DuckDB file."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from fastapi.testclient import TestClient

from outcomewatch.api import create_app
from outcomewatch.store.queries import Reader
from outcomewatch.store.schema import DDL

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


# (id, incident_id, transition, target, status, attempts, created_at, sent_at, last_error).
# Rows 2, 3 and 4 share created_at, so pages of 2 split a tie.
OUTBOX = [
    (1, 1, "opened", "alertmanager", "sent", 1, minutes(1), minutes(1.5), None),
    (2, 1, "opened", "webhook", "failed", 3, minutes(2), None, "HTTP 500 from webhook"),
    (3, 2, "opened", "alertmanager", "pending", 0, minutes(2), None, None),
    (4, 2, "opened", "webhook", "sent", 1, minutes(2), minutes(3), None),
    (5, 1, "acknowledged", "alertmanager", "pending", 0, minutes(4), None, None),
]
NEWEST_FIRST = [5, 4, 3, 2, 1]


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(str(tmp_path / "outcomewatch.duckdb"))
    connection.execute("SET GLOBAL TimeZone = 'Asia/Kolkata'")
    connection.execute(DDL)
    connection.executemany(
        "INSERT INTO outbox (id, incident_id, transition, target, route, payload, status,"
        " attempts, created_at, next_attempt_at, sent_at, last_error)"
        " VALUES (?, ?, ?, ?, 'pager', '{}', ?, ?, ?, ?, ?, ?)",
        [(i, inc, tr, tg, st, n, at, at + timedelta(seconds=30), sent, err)
         for i, inc, tr, tg, st, n, at, sent, err in OUTBOX],
    )
    yield connection
    connection.close()


@pytest.fixture
def client(conn: duckdb.DuckDBPyConnection) -> TestClient:
    return TestClient(create_app(Reader(conn)))


def ids(client: TestClient, **params: Any) -> list[int]:
    response = client.get("/api/v1/notifications", params=params)
    assert response.status_code == 200, response.text
    return [n["id"] for n in response.json()["notifications"]]


def test_notifications_are_listed_newest_first_with_ties_broken_by_id(client: TestClient) -> None:
    assert ids(client) == NEWEST_FIRST


def test_a_notification_has_every_contract_field(client: TestClient) -> None:
    body = client.get("/api/v1/notifications", params={"status": "failed"}).json()
    assert body == {"notifications": [{
        "id": 2, "incident_id": 1, "transition": "opened", "target": "webhook",
        "route": "pager", "status": "failed", "attempts": 3,
        "created_at": "2024-05-01T12:02:00Z", "next_attempt_at": "2024-05-01T12:02:30Z",
        "sent_at": None, "last_error": "HTTP 500 from webhook",
    }], "next_cursor": None}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"status": "pending"}, [5, 3]),
        ({"status": "sent"}, [4, 1]),
        ({"incident_id": 1}, [5, 2, 1]),
        ({"incident_id": 2, "status": "sent"}, [4]),
        ({"incident_id": 99}, []),
    ],
)
def test_notification_filters_all_apply(client: TestClient, params: dict[str, Any],
                                        expected: list[int]) -> None:
    assert ids(client, **params) == expected


@pytest.mark.parametrize("limit", [1, 2, 4, 5])
def test_notification_pages_cover_every_row_once_in_order(client: TestClient, limit: int) -> None:
    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        body = client.get("/api/v1/notifications", params=params).json()
        seen += [n["id"] for n in body["notifications"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == NEWEST_FIRST


def test_notification_pages_keep_the_filters(client: TestClient) -> None:
    first = client.get("/api/v1/notifications", params={"incident_id": 1, "limit": 2}).json()
    second = client.get("/api/v1/notifications",
                        params={"incident_id": 1, "limit": 2, "cursor": first["next_cursor"]})
    assert [n["id"] for n in first["notifications"] + second.json()["notifications"]] == [
        5, 2, 1]


@pytest.mark.parametrize(
    "query", ["status=sending", "incident_id=0", "incident_id=x", "limit=0", "limit=1001"]
)
def test_an_out_of_contract_notification_parameter_is_422(client: TestClient,
                                                          query: str) -> None:
    assert client.get(f"/api/v1/notifications?{query}").status_code == 422


def test_a_notifications_cursor_we_did_not_issue_is_400(client: TestClient) -> None:
    response = client.get("/api/v1/notifications", params={"cursor": "garbage!"})
    assert (response.status_code, response.json()) == (400, {"detail": "invalid cursor"})


def test_readyz_is_ready_when_ready(conn: duckdb.DuckDBPyConnection) -> None:
    response = TestClient(create_app(Reader(conn), ready=lambda: True)).get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


def test_readyz_is_503_not_ready_otherwise(conn: duckdb.DuckDBPyConnection) -> None:
    response = TestClient(create_app(Reader(conn), ready=lambda: False)).get("/readyz")
    assert (response.status_code, response.json()) == (503, {"status": "not ready"})


def test_metrics_serves_the_exposition_as_prometheus_text(
    conn: duckdb.DuckDBPyConnection,
) -> None:
    exposition = b"# TYPE outcomewatch_runs_total counter\noutcomewatch_runs_total 3.0\n"
    response = TestClient(create_app(Reader(conn), metrics=lambda: exposition)).get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert response.content == exposition


def test_metrics_is_404_when_not_enabled(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 404
