"""The reads the server itself makes (the API's are in queries.py): what a restart observes
again, a failed run's trace for its evidence, schedule progress (the outbox's are in
outbox.py).

Each read takes its own cursor from the shared connection, so it may run in any thread while
the writer thread writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import duckdb

from outcomewatch.store.outbox import OutboxReads


class ServerReads(OutboxReads):
    conn: duckdb.DuckDBPyConnection

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        cursor = self.conn.cursor()
        try:
            return cursor.execute(sql, params).fetchall()
        finally:
            cursor.close()

    def last_received_ns(self) -> int | None:
        """When the newest stored span was received (None for an empty database)."""
        rows = self._rows("SELECT max(received_ns) FROM spans")
        row = rows[0] if rows else None
        return None if row is None or row[0] is None else int(row[0])

    def observed_before_ns(self) -> int | None:
        """The stored watermark: every span received before it had been observed and what was
        decided from it stored (None: not known for any span; see pipeline.py)."""
        rows = self._rows("SELECT max(observed_before_ns) FROM verdict_state")
        row = rows[0] if rows else None
        return None if row is None or row[0] is None else int(row[0])

    def span_names(self, since_ns: int, until_ns: int) -> list[str]:
        """The distinct names of the spans received in [since_ns, until_ns)."""
        rows = self._rows("SELECT DISTINCT name FROM spans WHERE received_ns >= ? "
                          "AND received_ns < ?", [since_ns, until_ns])
        return [str(r[0]) for r in rows]

    def recovery_spans(
        self, since_ns: int, *, all_since_ns: int | None = None, names: Sequence[str] = (),
    ) -> list[tuple[bytes, bytes, str, int, str]]:
        """What a restart must observe again, as (span, resource, scope, received_ns, trace_id)
        in the order received: every span of a trace with an open run; every span received since
        ``all_since_ns`` (traces that may not have gone idle yet; ``since_ns`` if None); and,
        received since ``since_ns``, the spans named in ``names`` (the ones a rule may still
        hold, e.g. an outcome awaited for a long ``within``)."""
        all_since = since_ns if all_since_ns is None else all_since_ns
        rows = self._rows(
            "SELECT s.span, r.resource, s.scope, s.received_ns, s.trace_id FROM spans s "
            "JOIN resources r ON r.id = s.resource_id WHERE s.received_ns >= ? "
            "OR (s.received_ns >= ? AND list_contains(?, s.name)) "
            "OR s.trace_id IN (SELECT trace_id FROM runs WHERE status = 'open') "
            "ORDER BY s.received_ns",
            [all_since, since_ns, list(names)],
        )
        return [(bytes(r[0]), bytes(r[1]), str(r[2]), int(r[3]), str(r[4])) for r in rows]

    def schedule_progress(self) -> dict[str, datetime]:
        """Per scheduled rule, the time up to which its slots have been judged."""
        rows = self._rows("SELECT rule, epoch_us(judged_until) FROM schedule_state")
        return {str(r[0]): datetime.fromtimestamp(r[1] / 1e6, UTC) for r in rows}

    def open_incident_counts(self) -> list[tuple[str, str, int]]:
        """(rule, severity, count) of incidents open or acknowledged."""
        rows = self._rows(
            "SELECT rule, severity, count(*) FROM incidents "
            "WHERE status IN ('open', 'acknowledged') GROUP BY ALL ORDER BY ALL"
        )
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    def decided_run_ids(self, trace_ids: Sequence[str]) -> list[str]:
        """Ids of the runs of these traces that already have a verdict."""
        rows = self._rows(
            "SELECT id FROM runs WHERE status <> 'open' AND list_contains(?, trace_id)",
            [list(trace_ids)],
        )
        return [str(r[0]) for r in rows]
