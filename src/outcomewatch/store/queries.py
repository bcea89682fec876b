"""Read-side queries over the DuckDB schema in store/schema.py, returning the rows of
store/rows.py.

Pagination is keyset, newest first (cursors: store/rows.py).

The writer (store/duckdb.py, store/verdicts.py, store/incidents.py) owns these tables; nothing
here writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import duckdb

from outcomewatch import incident_file
from outcomewatch.errors import StoreError
from outcomewatch.model import IncidentStatus, RunStatus, Severity, Span
from outcomewatch.otlp_decode import decode_stored_span
from outcomewatch.store import traces
from outcomewatch.store.rows import (
    FAILURES_SQL,
    INCIDENTS,
    NOTIFICATIONS,
    RUNS,
    TIMELINE_LIMIT,
    TIMELINE_SQL,
    FailureRow,
    IncidentDetail,
    IncidentRow,
    Listing,
    NotificationRow,
    Page,
    RunRow,
    TimelineEvent,
    decode_cursor,
    encode_cursor,
    failure_row,
    incident_row,
    utc,
)

T = TypeVar("T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Reader:
    """Read-only queries over the DuckDB schema in store/schema.py.

    Thread-safe: each call uses its own cursor from the shared connection (``conn.cursor()``),
    since FastAPI runs sync endpoints in a threadpool. duckdb errors surface as StoreError
    (cause kept); a bad pagination cursor as InvalidCursor (a ValueError).
    """

    def __init__(self, conn: duckdb.DuckDBPyConnection, *,
                 trace_idle: timedelta | None = None) -> None:
        """``trace_idle``: the server's, for the idle horizon of open runs without a
        deadline (their ``due_at``); None leaves it unknown."""
        self._conn = conn
        self._trace_idle = trace_idle

    def fetch(self, *queries: tuple[str, Sequence[object]]) -> list[list[tuple[Any, ...]]]:
        """The rows of each query, all read in one transaction (one consistent snapshot); for
        the read modules beside this one (store/search.py, store/console.py)."""
        return self._fetch(*queries)

    def _fetch(self, *queries: tuple[str, Sequence[object]]) -> list[list[tuple[Any, ...]]]:
        """The rows of each query, all read in one transaction (one consistent snapshot)."""
        try:
            with self._conn.cursor() as cur:
                cur.begin()
                try:
                    return [cur.execute(sql, params).fetchall() for sql, params in queries]
                finally:
                    cur.rollback()
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {exc}") from exc

    def _page(
        self,
        listing: Listing[T],
        filters: Mapping[str, object],
        limit: int,
        cursor: str | None,
    ) -> Page[T]:
        """One page of ``listing``: the filters whose value is not None must all match.

        Identifiers (the listing's table and columns, the filter keys) are constants of this
        module, never input; every value from a caller goes through a ``?`` parameter.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        given = [(column, value) for column, value in filters.items() if value is not None]
        where = [f"{column} = ?" for column, _ in given]
        params: list[object] = [value for _, value in given]
        sort = listing.sort_column
        if cursor is not None:
            at_us, last_id = decode_cursor(cursor, listing.id_type)
            # The plain bound lets duckdb prune row groups by min/max; the row comparison is
            # the exact keyset condition (ties on time are broken by id).
            where.append(f"{sort} <= make_timestamptz(?)")
            where.append(f"({sort}, id) < (make_timestamptz(?), ?)")
            params += [at_us, at_us, last_id]
        sql = f"SELECT {listing.columns} FROM {listing.table}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {sort} DESC, id DESC LIMIT ?"
        params.append(limit + 1)  # the extra row only says that another page exists
        [rows] = self._fetch((sql, params))
        last = rows[limit - 1] if len(rows) > limit else None
        return Page(
            tuple(listing.convert(row) for row in rows[:limit]),
            encode_cursor(last[listing.sort_index], last[0]) if last else None,
        )

    def list_runs(
        self,
        *,
        trace_id: str | None,
        rule: str | None,
        status: RunStatus | None,
        limit: int,
        cursor: str | None,
    ) -> Page[RunRow]:
        """Runs matching every given filter, newest ``opened_at`` first (ties by id)."""
        return self.list_runs_by(trace_id=trace_id, rule=rule, status=status, limit=limit,
                                 cursor=cursor)

    def list_runs_by(
        self,
        *,
        trace_id: str | None = None,
        rule: str | None = None,
        status: RunStatus | None = None,
        reason: str | None = None,
        limit: int,
        cursor: str | None = None,
    ) -> Page[RunRow]:
        """list_runs with more filters (the console's): every given one must match."""
        filters = {"trace_id": trace_id, "rule": rule,
                   "status": None if status is None else status.value, "reason": reason}
        return self._with_idle_horizons(self._page(RUNS, filters, limit, cursor))

    def _with_idle_horizons(self, page: Page[RunRow]) -> Page[RunRow]:
        """Open runs without a deadline are due when their trace has been idle for the trace
        idle time: from its newest indexed span (the last moment's spans may move it on)."""
        waiting = {r.trace_id for r in page.items
                   if r.status is RunStatus.OPEN and r.due_at is None}
        if not waiting or self._trace_idle is None:
            return page
        try:
            with self._conn.cursor() as cur:
                last = traces.last_received(cur, sorted(waiting))
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {exc}") from exc
        idle = self._trace_idle
        items = tuple(
            replace(r, due_at=_EPOCH + timedelta(microseconds=last[r.trace_id] // 1000) + idle)
            if r.trace_id in waiting and r.due_at is None and r.status is RunStatus.OPEN
            and r.trace_id in last else r
            for r in page.items)
        return Page(items, page.next_cursor)

    def list_incidents(
        self,
        *,
        status: IncidentStatus | None,
        rule: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page[IncidentRow]:
        """Incidents matching every given filter, latest ``last_failure_at`` first (ties by id)."""
        return self.list_incidents_by(status=status, rule=rule, limit=limit, cursor=cursor)

    def list_incidents_by(
        self,
        *,
        status: IncidentStatus | None = None,
        rule: str | None = None,
        owner: str | None = None,
        severity: Severity | None = None,
        limit: int,
        cursor: str | None = None,
    ) -> Page[IncidentRow]:
        """list_incidents with more filters (the console's): every given one must match."""
        filters = {"status": None if status is None else status.value, "rule": rule,
                   "owner": owner, "severity": None if severity is None else severity.value}
        return self._page(INCIDENTS, filters, limit, cursor)

    def list_notifications(
        self, *, status: str | None, incident_id: int | None, limit: int, cursor: str | None
    ) -> Page[NotificationRow]:
        """Outbox rows matching every given filter, newest ``created_at`` first (ties by id)."""
        filters = {"status": status, "incident_id": incident_id}
        return self._page(NOTIFICATIONS, filters, limit, cursor)

    def get_incident(self, incident_id: int, *, failures_limit: int = 20) -> IncidentDetail | None:
        """The incident, its ``failures_limit`` newest failures (newest first) and its timeline
        (oldest first, the latest TIMELINE_LIMIT events), or None."""
        rows, failures, timeline = self._fetch(
            (f"SELECT {INCIDENTS.columns} FROM incidents WHERE id = ?", [incident_id]),
            (FAILURES_SQL, [incident_id, max(failures_limit, 0)]),
            (TIMELINE_SQL, [incident_id, TIMELINE_LIMIT]),
        )
        if not rows:
            return None
        return IncidentDetail(
            incident_row(rows[0]),
            tuple(self._completed(failure_row(row)) for row in failures),
            tuple(TimelineEvent(utc(at), kind, actor, comment)
                  for at, kind, actor, comment in timeline),
        )

    def rule_stats(self) -> dict[str, tuple[int, int, int, float | None, float | None]]:
        """Per rule: runs passed, failed, open, and the p50 / p95 seconds from a run's opening
        to its passing verdict."""
        (rows,) = self._fetch((
            "SELECT rule, count(*) FILTER (status = 'passed'), count(*) FILTER "
            "(status = 'failed'), count(*) FILTER (status = 'open'), "
            "quantile_cont(epoch(closed_at - opened_at), 0.5) FILTER (status = 'passed'), "
            "quantile_cont(epoch(closed_at - opened_at), 0.95) FILTER (status = 'passed') "
            "FROM runs GROUP BY rule", []))
        return {str(r[0]): (int(r[1]), int(r[2]), int(r[3]), r[4], r[5]) for r in rows}

    def _completed(self, failure: FailureRow) -> FailureRow:
        """The failure with the evidence of its stored trace (see incident_file.py). With no
        span stored (retention deleted them; or a file of an earlier version, whose detail was
        complete when written) the detail is returned as stored."""
        if not failure.detail.get("trigger"):
            return failure
        until = failure.detail.get("received_until_ns")
        spans = self.get_trace(failure.trace_id,
                               until_ns=until if isinstance(until, int) else None)
        if not spans:
            return failure
        return replace(failure, detail=incident_file.complete(failure.detail, spans))

    def get_trace(self, trace_id: str, *, until_ns: int | None = None) -> list[Span] | None:
        """Every span of the trace once (received up to ``until_ns``), ordered by start time
        (ties by span_id), or None when no span of it is stored. A retried export stores a span
        twice; the first received copy wins."""
        page = self.get_trace_page(trace_id, limit=None, until_ns=until_ns)
        return None if page is None else list(page.items)

    def get_trace_page(
        self, trace_id: str, *, limit: int | None, cursor: str | None = None,
        until_ns: int | None = None,
    ) -> Page[Span] | None:
        """``limit`` spans of the trace (all when None) after ``cursor``, by start time; None
        when no span of it is stored. Found through the traces table (store/traces.py)."""
        after = None
        if cursor is not None:
            start_ns, span_id = decode_cursor(cursor, str)
            after = (start_ns, str(span_id))
        try:
            with self._conn.cursor() as cur:
                rows = traces.span_rows(cur, trace_id, until_ns=until_ns, after=after,
                                        limit=None if limit is None else limit + 1)
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {exc}") from exc
        if rows is None:
            return None
        more = limit is not None and len(rows) > limit
        rows = rows[:limit] if limit is not None else rows
        spans = tuple(decode_stored_span(span, resource, scope=scope)
                      for span, resource, scope, _, _ in rows)
        last = rows[-1] if more else None
        return Page(spans, encode_cursor(last[3], last[4]) if last is not None else None)
