"""Read-side queries over the DuckDB schema in store/schema.py.

Timestamps are selected as ``epoch_us(...)`` integers and turned into UTC datetimes here. That
sidesteps two duckdb behaviours: fetching TIMESTAMPTZ into Python needs ``pytz`` (not a
dependency), and it renders in the connection's TimeZone setting rather than UTC.

Pagination is keyset, newest first. A cursor is the urlsafe-base64 JSON of the last row's sort
key ``[epoch_us, id]``; clients must treat it as opaque.

The writer (store/incidents.py) owns these tables; nothing here writes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import duckdb

from outcomewatch import incident_file
from outcomewatch.errors import StoreError
from outcomewatch.model import IncidentStatus, RunStatus, Severity, Span
from outcomewatch.otlp import decode_stored_span
from outcomewatch.store import traces

T = TypeVar("T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Well inside both BIGINT and duckdb's timestamp range (about +-146,000 years in microseconds).
_CURSOR_INT_BOUND = 2**62
# The timeline of one incident is returned whole up to this many events (the latest ones).
TIMELINE_LIMIT = 1000


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
    late_outcomes: tuple[str, ...] = ()  # outcomes that arrived after the run failed
    late_at: datetime | None = None
    incident_id: int | None = None
    # When an open run will be judged (its deadline; the idle horizon once the engine stores
    # it); None for a closed run, or an open one waiting for its trace to go idle.
    due_at: datetime | None = None
    at_risk: tuple[AtRiskSpan, ...] = ()


@dataclass(frozen=True, slots=True)
class AtRiskSpan:
    """A span that matched an expectation's span/service but not its other conditions."""

    name: str
    status_message: str


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
    description: str = ""
    group: Mapping[str, Any] = field(default_factory=dict)  # group_by values; {} if ungrouped
    acknowledged_at: datetime | None = None
    resolved_at: datetime | None = None


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
    late_outcomes: tuple[str, ...] = ()  # from the run: outcomes that arrived after the verdict
    late_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    at: datetime
    kind: str  # opened, acknowledged, resolved, reopened, late_outcome, ...
    actor: str
    comment: str | None


@dataclass(frozen=True, slots=True)
class IncidentDetail:
    incident: IncidentRow
    failures: tuple[FailureRow, ...]
    timeline: tuple[TimelineEvent, ...] = ()  # oldest first


@dataclass(frozen=True, slots=True)
class NotificationRow:
    """One outbox row: a transition to deliver to one target."""

    id: int
    incident_id: int
    transition: str
    target: str
    route: str
    status: str  # pending, sent or failed
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    sent_at: datetime | None
    last_error: str | None


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
    if not _bounded_int(at_us) or type(row_id) is not id_type:
        raise InvalidCursor("invalid cursor")
    if not (_utf8(row_id) if isinstance(row_id, str) else _bounded_int(row_id)):
        raise InvalidCursor("invalid cursor")
    return at_us, row_id


def _bounded_int(value: object) -> bool:
    return type(value) is int and -_CURSOR_INT_BOUND < value < _CURSOR_INT_BOUND


def _utf8(value: str) -> bool:
    """False for a string duckdb cannot bind: JSON's ``"\\ud800"`` decodes to a lone surrogate,
    which UTF-8 cannot encode (it failed in the query, i.e. as a 503 instead of a 400)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_RUN_COLUMNS = """id, rule, trace_id, status, epoch_us(opened_at), epoch_us(closed_at), reason,
    missing, late_outcomes, epoch_us(late_at), incident_id, epoch_us(deadline_at), at_risk"""
_INCIDENT_COLUMNS = """id, rule, status, severity, owner, route, epoch_us(opened_at),
    epoch_us(last_failure_at), failure_count, summary, description, group_key,
    epoch_us(acknowledged_at), epoch_us(resolved_at)"""
_NOTIFICATION_COLUMNS = """id, incident_id, transition, target, route, status, attempts,
    epoch_us(created_at), epoch_us(next_attempt_at), epoch_us(sent_at), last_error"""
_FAILURES_SQL = """SELECT f.run_id, f.trace_id, epoch_us(f.failed_at), f.reason, f.missing,
    f.detail, r.late_outcomes, epoch_us(r.late_at)
    FROM incident_failures f LEFT JOIN runs r ON r.id = f.run_id WHERE f.incident_id = ?
    ORDER BY f.failed_at DESC, f.run_id DESC LIMIT ?"""
# The latest TIMELINE_LIMIT events, returned oldest first; rowid breaks ties on time in
# insertion order (one transaction writes "reopened" and "late_outcome" at the same instant).
_TIMELINE_SQL = """SELECT epoch_us(occurred_at), kind, actor, comment FROM (
    SELECT occurred_at, kind, actor, comment, rowid AS seq FROM incident_events
    WHERE incident_id = ? ORDER BY occurred_at DESC, seq DESC LIMIT ?) ORDER BY occurred_at, seq"""


def _at_risk(text: str | None) -> tuple[AtRiskSpan, ...]:
    """The runs.at_risk JSON, read leniently: NULL, bad JSON or odd items read as nothing."""
    try:
        items = json.loads(text) if text else []
    except ValueError:
        return ()
    if not isinstance(items, list):
        return ()
    return tuple(
        AtRiskSpan(str(item.get("name", "")), str(item.get("status_message", "")))
        for item in items if isinstance(item, dict)
    )


def _run(row: Sequence[Any]) -> RunRow:
    status = RunStatus(row[3])
    return RunRow(
        id=row[0], rule=row[1], trace_id=row[2], status=status,
        opened_at=_utc(row[4]), closed_at=_utc_or_none(row[5]), reason=row[6],
        missing=tuple(row[7] or ()), late_outcomes=tuple(row[8] or ()),
        late_at=_utc_or_none(row[9]), incident_id=row[10],
        due_at=_utc_or_none(row[11]) if status is RunStatus.OPEN else None,
        at_risk=_at_risk(row[12]),
    )


def _group(group_key: str | None) -> Mapping[str, Any]:
    """The group_by values from ``incidents.group_key`` (canonical JSON, '' when ungrouped)."""
    try:
        group = json.loads(group_key) if group_key else {}
    except ValueError:
        return {}
    return group if isinstance(group, dict) else {}


def _incident(row: Sequence[Any]) -> IncidentRow:
    return IncidentRow(
        id=row[0], rule=row[1], status=IncidentStatus(row[2]), severity=Severity(row[3]),
        owner=row[4], route=row[5], opened_at=_utc(row[6]), last_failure_at=_utc(row[7]),
        failure_count=row[8], summary=row[9], description=row[10] or "",
        group=_group(row[11]), acknowledged_at=_utc_or_none(row[12]),
        resolved_at=_utc_or_none(row[13]),
    )


def _failure(row: Sequence[Any]) -> FailureRow:
    detail = json.loads(row[5]) if row[5] else {}
    return FailureRow(
        run_id=row[0], trace_id=row[1], failed_at=_utc(row[2]), reason=row[3],
        missing=tuple(row[4] or ()), detail=detail if isinstance(detail, dict) else {},
        late_outcomes=tuple(row[6] or ()), late_at=_utc_or_none(row[7]),
    )


def _notification(row: Sequence[Any]) -> NotificationRow:
    return NotificationRow(
        id=row[0], incident_id=row[1], transition=row[2], target=row[3], route=row[4],
        status=row[5], attempts=row[6], created_at=_utc(row[7]), next_attempt_at=_utc(row[8]),
        sent_at=_utc_or_none(row[9]), last_error=row[10],
    )


@dataclass(frozen=True, slots=True)
class _Listing(Generic[T]):
    """A paginated table: ``sort_index`` is the position of epoch_us(sort_column) in columns."""

    table: str
    columns: str
    sort_column: str
    sort_index: int
    id_type: type[str] | type[int]
    convert: Callable[[Sequence[Any]], T]


_RUNS = _Listing("runs", _RUN_COLUMNS, "opened_at", 4, str, _run)
_INCIDENTS = _Listing("incidents", _INCIDENT_COLUMNS, "last_failure_at", 7, int, _incident)
_NOTIFICATIONS = _Listing("outbox", _NOTIFICATION_COLUMNS, "created_at", 7, int, _notification)


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
        listing: _Listing[T],
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
        return self._with_idle_horizons(self._page(_RUNS, filters, limit, cursor))

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
        return self._page(_INCIDENTS, filters, limit, cursor)

    def list_notifications(
        self, *, status: str | None, incident_id: int | None, limit: int, cursor: str | None
    ) -> Page[NotificationRow]:
        """Outbox rows matching every given filter, newest ``created_at`` first (ties by id)."""
        filters = {"status": status, "incident_id": incident_id}
        return self._page(_NOTIFICATIONS, filters, limit, cursor)

    def get_incident(self, incident_id: int, *, failures_limit: int = 20) -> IncidentDetail | None:
        """The incident, its ``failures_limit`` newest failures (newest first) and its timeline
        (oldest first, the latest TIMELINE_LIMIT events), or None."""
        rows, failures, timeline = self._fetch(
            (f"SELECT {_INCIDENTS.columns} FROM incidents WHERE id = ?", [incident_id]),
            (_FAILURES_SQL, [incident_id, max(failures_limit, 0)]),
            (_TIMELINE_SQL, [incident_id, TIMELINE_LIMIT]),
        )
        if not rows:
            return None
        return IncidentDetail(
            _incident(rows[0]),
            tuple(self._completed(_failure(row)) for row in failures),
            tuple(TimelineEvent(_utc(at), kind, actor, comment)
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
