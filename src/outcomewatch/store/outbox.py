"""The notification outbox reads the notifier makes (its writes go through the writer thread,
``Store.mark_notification``).

Each read takes its own cursor from the shared connection, so it may run in any thread while
the writer thread writes. Rows are read per target (route and target kind): the notifier
delivers each target on its own, so that a stuck target never keeps another's rows waiting.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import Any

import duckdb

from outcomewatch.model import OutboxRow
from outcomewatch.store.incidents import firing_snapshots

_DUE = (
    "SELECT id, incident_id, transition, target, route, payload, attempts, "
    "epoch_us(created_at) FROM outbox o WHERE status IN ('pending', 'failed') "
    "AND next_attempt_at <= ? {where} AND NOT EXISTS (SELECT 1 FROM outbox e "
    "WHERE e.incident_id = o.incident_id AND e.target = o.target AND e.id < o.id "
    "AND e.status <> 'sent') ORDER BY id LIMIT ?"
)


class OutboxReads:
    conn: duckdb.DuckDBPyConnection

    def _outbox_rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        cursor = self.conn.cursor()
        try:
            return cursor.execute(sql, params).fetchall()
        finally:
            cursor.close()

    def due_notifications(
        self, now: datetime, limit: int, *, route: str | None = None, target: str | None = None,
        exclude: Collection[tuple[str, str]] = (),
    ) -> list[OutboxRow]:
        """Rows pending or failed whose next attempt is due, oldest first; a row behind an
        unsent earlier row of its incident and target is left out (it would only wait).

        ``route`` and ``target`` keep only that route's / target kind's rows; ``exclude`` leaves
        out the (route, target) pairs listed."""
        where, params = "", list[object]([now])
        if route is not None:
            where, params = where + " AND route = ?", [*params, route]
        if target is not None:
            where, params = where + " AND target = ?", [*params, target]
        if exclude:
            where += " AND NOT list_contains(?, route || chr(0) || target)"
            params.append([f"{r}\0{t}" for r, t in exclude])
        rows = self._outbox_rows(_DUE.format(where=where), [*params, limit])
        return [
            OutboxRow(int(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), json.loads(r[5]),
                      int(r[6]), datetime.fromtimestamp(r[7] / 1e6, UTC))
            for r in rows
        ]

    def firing_incidents(self) -> list[dict[str, Any]]:
        """Snapshots (as in the outbox payload) of the incidents open or acknowledged."""
        cursor = self.conn.cursor()
        try:
            return firing_snapshots(cursor)
        finally:
            cursor.close()

    def notification_queue(self) -> tuple[int, datetime | None]:
        """How many outbox rows are not sent yet, and when the oldest of them was written."""
        rows = self._outbox_rows(
            "SELECT count(*), epoch_us(min(created_at)) FROM outbox WHERE status <> 'sent'"
        )
        count, oldest = rows[0] if rows else (0, None)
        when = None if oldest is None else datetime.fromtimestamp(oldest / 1e6, UTC)
        return int(count), when
