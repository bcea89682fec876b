"""Helpers shared by the API tests: a GET that must succeed, and incident actions over the
real lifecycle SQL (store/incidents.act) on a real DuckDB connection."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import duckdb
from fastapi.testclient import TestClient

from outcomewatch.store.incidents import Action, ActionResult, act


def get_ok(client: TestClient, url: str, **params: Any) -> Any:
    response = client.get(url, params=params)
    assert response.status_code == 200, response.text
    return response.json()


class SqlActions:
    """IncidentActions over the real lifecycle SQL, committed like the server's writer."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, *, at: datetime,
                 targets_for_route: Mapping[str, tuple[str, ...]]) -> None:
        self.conn = conn
        self.at = at
        self.targets_for_route = dict(targets_for_route)

    async def __call__(
        self, incident_id: int, action: Action, *, actor: str, comment: str | None
    ) -> ActionResult:
        with self.conn.cursor() as cur:
            cur.begin()
            try:
                result = act(cur, incident_id, action, at=self.at, actor=actor, comment=comment,
                             targets_for_route=self.targets_for_route)
            except BaseException:
                cur.rollback()
                raise
            cur.commit()
            return result


def index_traces(conn: Any) -> None:
    """Rebuild the trace index from spans inserted by hand (the writer keeps it at ingest)."""
    from outcomewatch.store.schema import BACKFILL_TRACES

    conn.execute("DELETE FROM trace_index")
    conn.execute(BACKFILL_TRACES, {"since": -(2**63)})
