"""Bearer tokens: the api token guards writes, the read token reads (the api token reads too);
the probes and the docs stay open."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
from fastapi.testclient import TestClient

from outcomewatch.api import create_app
from outcomewatch.store.incidents import Action, ActionResult, act
from outcomewatch.store.queries import Reader
from outcomewatch.store.schema import DDL

API, READ = "api-secret", "read-secret"
WRITE_URL = "/api/v1/incidents/1/acknowledge"
READ_URLS = ["/api/v1/runs", "/api/v1/incidents", "/api/v1/incidents/1",
             "/api/v1/notifications", f"/api/v1/traces/{'a' * 32}", "/metrics"]
OPEN_URLS = ["/healthz", "/readyz", "/docs", "/openapi.json"]


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(str(tmp_path / "outcomewatch.duckdb"))
    connection.execute(DDL)
    at = datetime(2024, 5, 1, tzinfo=UTC)
    connection.execute(
        "INSERT INTO incidents (id, rule, status, severity, owner, route, opened_at,"
        " last_failure_at, failure_count, summary) VALUES"
        " (1, 'checkout', 'open', 'critical', 'team-pay', 'pager', ?, ?, 1, 'failed')", [at, at])
    yield connection
    connection.close()


def client_with(conn: duckdb.DuckDBPyConnection, *, api_token: str | None = API,
                read_token: str | None = READ) -> TestClient:
    async def actions(incident_id: int, action: Action, *, actor: str,
                      comment: str | None) -> ActionResult:
        with conn.cursor() as cur:
            cur.begin()
            result = act(cur, incident_id, action, at=datetime.now(UTC), actor=actor,
                         comment=comment, targets_for_route={})
            cur.commit()
            return result

    return TestClient(create_app(Reader(conn), actions=actions, api_token=api_token,
                                 read_token=read_token, metrics=lambda: b"up 1\n"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_write_without_a_token_is_401_with_a_bearer_challenge(
    conn: duckdb.DuckDBPyConnection,
) -> None:
    response = client_with(conn).post(WRITE_URL)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_a_write_with_a_wrong_token_is_403(conn: duckdb.DuckDBPyConnection) -> None:
    assert client_with(conn).post(WRITE_URL, headers=bearer("nope")).status_code == 403


def test_a_write_with_the_read_token_is_403(conn: duckdb.DuckDBPyConnection) -> None:
    assert client_with(conn).post(WRITE_URL, headers=bearer(READ)).status_code == 403


def test_a_write_with_the_api_token_is_made(conn: duckdb.DuckDBPyConnection) -> None:
    response = client_with(conn).post(WRITE_URL, headers=bearer(API))
    assert (response.status_code, response.json()["status"]) == (200, "acknowledged")


def test_a_non_bearer_authorization_is_401(conn: duckdb.DuckDBPyConnection) -> None:
    response = client_with(conn).post(WRITE_URL, headers={"Authorization": f"Basic {API}"})
    assert response.status_code == 401


def test_writes_are_checked_before_a_read_only_deployment_answers_503(
    conn: duckdb.DuckDBPyConnection,
) -> None:
    client = TestClient(create_app(Reader(conn), api_token=API))
    assert client.post(WRITE_URL).status_code == 401
    assert client.post(WRITE_URL, headers=bearer(API)).status_code == 503


@pytest.mark.parametrize("url", READ_URLS)
def test_a_read_without_a_token_is_401_when_a_read_token_is_set(
    conn: duckdb.DuckDBPyConnection, url: str
) -> None:
    response = client_with(conn).get(url)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("url", READ_URLS)
def test_a_read_with_a_wrong_token_is_403(conn: duckdb.DuckDBPyConnection, url: str) -> None:
    assert client_with(conn).get(url, headers=bearer("nope")).status_code == 403


@pytest.mark.parametrize("token", [READ, API])
@pytest.mark.parametrize("url", ["/api/v1/incidents/1", "/metrics"])
def test_a_read_is_allowed_with_the_read_token_or_the_api_token(
    conn: duckdb.DuckDBPyConnection, url: str, token: str
) -> None:
    assert client_with(conn).get(url, headers=bearer(token)).status_code == 200


@pytest.mark.parametrize("url", OPEN_URLS)
def test_probes_and_docs_stay_open_when_tokens_are_set(
    conn: duckdb.DuckDBPyConnection, url: str
) -> None:
    assert client_with(conn).get(url).status_code == 200


def test_reads_stay_open_when_only_an_api_token_is_set(conn: duckdb.DuckDBPyConnection) -> None:
    client = client_with(conn, read_token=None)
    assert client.get("/api/v1/incidents/1").status_code == 200
    assert client.post(WRITE_URL).status_code == 401


def test_writes_need_the_read_token_when_only_a_read_token_is_set(
    conn: duckdb.DuckDBPyConnection,
) -> None:
    client = client_with(conn, api_token=None)
    assert client.post(WRITE_URL).status_code == 401
    assert client.post(WRITE_URL, headers=bearer(READ)).status_code == 200


def test_everything_is_open_without_tokens(conn: duckdb.DuckDBPyConnection) -> None:
    client = client_with(conn, api_token=None, read_token=None)
    assert client.get("/api/v1/incidents/1").status_code == 200
    assert client.post(WRITE_URL).status_code == 200


@pytest.mark.parametrize("option", ["api_token", "read_token"])
def test_an_empty_token_is_refused(conn: duckdb.DuckDBPyConnection, option: str) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        create_app(Reader(conn), **{option: ""})  # type: ignore[arg-type]


def test_openapi_declares_the_bearer_scheme_on_reads_and_writes(
    conn: duckdb.DuckDBPyConnection,
) -> None:
    schema = client_with(conn).get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    paths = schema["paths"]
    assert paths["/api/v1/incidents/{incident_id}/resolve"]["post"]["security"] == [
        {"HTTPBearer": []}]
    assert paths["/api/v1/runs"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in paths["/healthz"]["get"]
