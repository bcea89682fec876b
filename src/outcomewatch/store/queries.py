"""Read-side queries over the DuckDB schema in store/schema.py.

Timestamps are selected as ``epoch_us(...)`` integers and turned into UTC datetimes here. That
sidesteps two duckdb behaviours: fetching TIMESTAMPTZ into Python needs ``pytz`` (not a
dependency), and it renders in the connection's TimeZone setting rather than UTC.

Pagination is keyset, newest first. A cursor is the urlsafe-base64 JSON of the last row's sort
key ``[epoch_us, id]``; clients must treat it as opaque.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import duckdb

from outcomewatch.errors import StoreError
from outcomewatch.model import IncidentStatus, RunStatus, Severity, Span
from outcomewatch.otlp import decode_stored_span

T = TypeVar("T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Well inside both BIGINT and duckdb's timestamp range (about +-146,000 years in microseconds).
_CURSOR_INT_BOUND = 2**62


class InvalidCursor(ValueError):
    """A pagination cursor this Reader did not produce (or produced for another listing)."""


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; ``next_cursor`` is None on the last page."""

    items: tuple[T, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class RunRow:
    id: str
    rule: str
    trace_id: str
    status: RunStatus
    opened_at: datetime
    closed_at: datetime | None
    reason: str | None
    missing: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IncidentRow:
    id: int
    rule: str
    status: IncidentStatus
    severity: Severity
    owner: str
    route: str
    opened_at: datetime
    last_failure_at: datetime
    failure_count: int
    summary: str


@dataclass(frozen=True, slots=True)
class FailureRow:
    """One failed run of an incident. ``detail`` is the stored JSON object as written (see the
    incident_failures comment in store/schema.py); a non-object detail reads as ``{}``."""

    run_id: str
    trace_id: str
    failed_at: datetime
    reason: str
    missing: tuple[str, ...]
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class IncidentDetail:
    incident: IncidentRow
    failures: tuple[FailureRow, ...]


def _utc(epoch_us: int) -> datetime:
    # timedelta arithmetic rather than fromtimestamp: exact to the microsecond, no float.
    return _EPOCH + timedelta(microseconds=epoch_us)


def _utc_or_none(epoch_us: int | None) -> datetime | None:
    return None if epoch_us is None else _utc(epoch_us)


def encode_cursor(epoch_us: int, row_id: str | int) -> str:
    raw = json.dumps([epoch_us, row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str, id_type: type[str] | type[int]) -> tuple[int, Any]:
    """The (epoch_us, id) sort key in ``cursor``; raise InvalidCursor for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:  # ValueError: JSON, UTF-8
        raise InvalidCursor("invalid cursor") from exc
    # bool is an int subclass; a cursor of [true, 1] is not one we wrote. Out-of-range ints
    # would fail in duckdb's parameter binding, i.e. as a StoreError (503) instead of a 400.
    if not isinstance(key, list) or len(key) != 2:
        raise InvalidCursor("invalid cursor")
    at_us, row_id = key
    if not _bounded_int(at_us) or type(row_id) is not id_type or (
        id_type is int and not _bounded_int(row_id)
    ):
        raise InvalidCursor("invalid cursor")
    return at_us, row_id


def _bounded_int(value: object) -> bool:
    return type(value) is int and -_CURSOR_INT_BOUND < value < _CURSOR_INT_BOUND


_RUN_COLUMNS = """id, rule, trace_id, status, epoch_us(opened_at), epoch_us(closed_at), reason,
    missing"""
_INCIDENT_COLUMNS = """id, rule, status, severity, owner, route, epoch_us(opened_at),
    epoch_us(last_failure_at), failure_count, summary"""


def _run(row: Sequence[Any]) -> RunRow:
    return RunRow(
        id=row[0], rule=row[1], trace_id=row[2], status=RunStatus(row[3]),
        opened_at=_utc(row[4]), closed_at=_utc_or_none(row[5]), reason=row[6],
        missing=tuple(row[7] or ()),
    )


def _incident(row: Sequence[Any]) -> IncidentRow:
    return IncidentRow(
        id=row[0], rule=row[1], status=IncidentStatus(row[2]), severity=Severity(row[3]),
        owner=row[4], route=row[5], opened_at=_utc(row[6]), last_failure_at=_utc(row[7]),
        failure_count=row[8], summary=row[9],
    )


def _failure(row: Sequence[Any]) -> FailureRow:
    detail = json.loads(row[5]) if row[5] else {}
    return FailureRow(
        run_id=row[0], trace_id=row[1], failed_at=_utc(row[2]), reason=row[3],
        missing=tuple(row[4] or ()), detail=detail if isinstance(detail, dict) else {},
    )


class Reader:
    """Read-only queries over the DuckDB schema in store/schema.py.

    Thread-safe: each call uses its own cursor from the shared connection (``conn.cursor()``),
    since FastAPI runs sync endpoints in a threadpool. duckdb errors surface as StoreError
    (cause kept); a bad pagination cursor as InvalidCursor (a ValueError).
    """

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self._conn = conn

    def _fetch(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        try:
            with self._conn.cursor() as cur:
                rows: list[tuple[Any, ...]] = cur.execute(sql, params).fetchall()
                return rows
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {exc}") from exc

    def _page(
        self,
        table: str,
        columns: str,
        sort_column: str,
        filters: list[tuple[str, object]],
        limit: int,
        cursor: str | None,
        id_type: type[str] | type[int],
    ) -> list[tuple[Any, ...]]:
        """Up to ``limit + 1`` rows (the extra one only says another page exists).

        Identifiers (``table``, ``columns``, ``sort_column``, the filter columns) are constants
        of this module, never input; every value from a caller goes through a ``?`` parameter.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        where = [f"{column} = ?" for column, _ in filters]
        params: list[object] = [value for _, value in filters]
        if cursor is not None:
            at_us, last_id = decode_cursor(cursor, id_type)
            # The plain bound lets duckdb prune row groups by min/max; the row comparison is
            # the exact keyset condition (ties on time are broken by id).
            where.append(f"{sort_column} <= make_timestamptz(?)")
            where.append(f"({sort_column}, id) < (make_timestamptz(?), ?)")
            params += [at_us, at_us, last_id]
        sql = f"SELECT {columns} FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {sort_column} DESC, id DESC LIMIT ?"
        params.append(limit + 1)
        return self._fetch(sql, params)

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
        filters: list[tuple[str, object]] = []
        if trace_id is not None:
            filters.append(("trace_id", trace_id))
        if rule is not None:
            filters.append(("rule", rule))
        if status is not None:
            filters.append(("status", status.value))
        rows = self._page("runs", _RUN_COLUMNS, "opened_at", filters, limit, cursor, str)
        runs = tuple(_run(row) for row in rows[:limit])
        last = rows[limit - 1] if len(rows) > limit else None
        return Page(runs, encode_cursor(last[4], last[0]) if last else None)

    def list_incidents(
        self,
        *,
        status: IncidentStatus | None,
        rule: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page[IncidentRow]:
        """Incidents matching every given filter, latest ``last_failure_at`` first (ties by id)."""
        filters: list[tuple[str, object]] = []
        if status is not None:
            filters.append(("status", status.value))
        if rule is not None:
            filters.append(("rule", rule))
        rows = self._page(
            "incidents", _INCIDENT_COLUMNS, "last_failure_at", filters, limit, cursor, int
        )
        incidents = tuple(_incident(row) for row in rows[:limit])
        last = rows[limit - 1] if len(rows) > limit else None
        return Page(incidents, encode_cursor(last[7], last[0]) if last else None)

    def get_incident(self, incident_id: int, *, failures_limit: int = 20) -> IncidentDetail | None:
        """The incident and its ``failures_limit`` newest failures (newest first), or None."""
        rows = self._fetch(f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id = ?", [incident_id])
        if not rows:
            return None
        failures = self._fetch(
            "SELECT run_id, trace_id, epoch_us(failed_at), reason, missing, detail"
            " FROM incident_failures WHERE incident_id = ?"
            " ORDER BY failed_at DESC, run_id DESC LIMIT ?",
            [incident_id, max(failures_limit, 0)],
        )
        return IncidentDetail(_incident(rows[0]), tuple(_failure(row) for row in failures))

    def get_trace(self, trace_id: str) -> list[Span] | None:
        """Every span of the trace once, ordered by start time (ties by span_id), or None when
        no span of it is stored.

        A retried export stores a span twice; the first received copy wins.
        """
        rows = self._fetch(
            "SELECT s.span, r.resource, s.scope FROM spans s"
            " JOIN resources r ON r.id = s.resource_id WHERE s.trace_id = ?"
            " QUALIFY row_number() OVER (PARTITION BY s.span_id ORDER BY s.received_ns) = 1"
            " ORDER BY s.start_ns, s.span_id",
            [trace_id],
        )
        if not rows:
            return None
        return [decode_stored_span(span, resource, scope=scope) for span, resource, scope in rows]
