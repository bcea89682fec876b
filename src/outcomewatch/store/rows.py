"""The rows the read side returns, as typed values: what the API and the console show of runs,
incidents, failures, timelines and notifications, the SELECT column lists they are read with,
their converters from result tuples, and the keyset cursors of their listings.

Timestamps are selected as ``epoch_us(...)`` integers and turned into UTC datetimes here
(``utc``): fetching TIMESTAMPTZ into Python needs ``pytz`` (not a dependency), and it renders in
the connection's TimeZone setting rather than UTC.

A cursor is the urlsafe-base64 JSON of the last row's sort key ``[epoch_us, id]``; clients must
treat it as opaque.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from outcomewatch.model import IncidentStatus, RunStatus, Severity

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


def utc(epoch_us: int) -> datetime:
    # timedelta arithmetic rather than fromtimestamp: exact to the microsecond, no float.
    return _EPOCH + timedelta(microseconds=epoch_us)


def utc_or_none(epoch_us: int | None) -> datetime | None:
    return None if epoch_us is None else utc(epoch_us)


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


RUN_COLUMNS = """id, rule, trace_id, status, epoch_us(opened_at), epoch_us(closed_at), reason,
    missing, late_outcomes, epoch_us(late_at), incident_id, epoch_us(deadline_at), at_risk"""
INCIDENT_COLUMNS = """id, rule, status, severity, owner, route, epoch_us(opened_at),
    epoch_us(last_failure_at), failure_count, summary, description, group_key,
    epoch_us(acknowledged_at), epoch_us(resolved_at)"""
NOTIFICATION_COLUMNS = """id, incident_id, transition, target, route, status, attempts,
    epoch_us(created_at), epoch_us(next_attempt_at), epoch_us(sent_at), last_error"""
FAILURES_SQL = """SELECT f.run_id, f.trace_id, epoch_us(f.failed_at), f.reason, f.missing,
    f.detail, r.late_outcomes, epoch_us(r.late_at)
    FROM incident_failures f LEFT JOIN runs r ON r.id = f.run_id WHERE f.incident_id = ?
    ORDER BY f.failed_at DESC, f.run_id DESC LIMIT ?"""
# The latest TIMELINE_LIMIT events, returned oldest first; rowid breaks ties on time in
# insertion order (one transaction writes "reopened" and "late_outcome" at the same instant).
TIMELINE_SQL = """SELECT epoch_us(occurred_at), kind, actor, comment FROM (
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


def run_row(row: Sequence[Any]) -> RunRow:
    status = RunStatus(row[3])
    return RunRow(
        id=row[0], rule=row[1], trace_id=row[2], status=status,
        opened_at=utc(row[4]), closed_at=utc_or_none(row[5]), reason=row[6],
        missing=tuple(row[7] or ()), late_outcomes=tuple(row[8] or ()),
        late_at=utc_or_none(row[9]), incident_id=row[10],
        due_at=utc_or_none(row[11]) if status is RunStatus.OPEN else None,
        at_risk=_at_risk(row[12]),
    )


def _group(group_key: str | None) -> Mapping[str, Any]:
    """The group_by values from ``incidents.group_key`` (canonical JSON, '' when ungrouped)."""
    try:
        group = json.loads(group_key) if group_key else {}
    except ValueError:
        return {}
    return group if isinstance(group, dict) else {}


def incident_row(row: Sequence[Any]) -> IncidentRow:
    return IncidentRow(
        id=row[0], rule=row[1], status=IncidentStatus(row[2]), severity=Severity(row[3]),
        owner=row[4], route=row[5], opened_at=utc(row[6]), last_failure_at=utc(row[7]),
        failure_count=row[8], summary=row[9], description=row[10] or "",
        group=_group(row[11]), acknowledged_at=utc_or_none(row[12]),
        resolved_at=utc_or_none(row[13]),
    )


def failure_row(row: Sequence[Any]) -> FailureRow:
    detail = json.loads(row[5]) if row[5] else {}
    return FailureRow(
        run_id=row[0], trace_id=row[1], failed_at=utc(row[2]), reason=row[3],
        missing=tuple(row[4] or ()), detail=detail if isinstance(detail, dict) else {},
        late_outcomes=tuple(row[6] or ()), late_at=utc_or_none(row[7]),
    )


def notification_row(row: Sequence[Any]) -> NotificationRow:
    return NotificationRow(
        id=row[0], incident_id=row[1], transition=row[2], target=row[3], route=row[4],
        status=row[5], attempts=row[6], created_at=utc(row[7]), next_attempt_at=utc(row[8]),
        sent_at=utc_or_none(row[9]), last_error=row[10],
    )


@dataclass(frozen=True, slots=True)
class Listing(Generic[T]):
    """A paginated table: ``sort_index`` is the position of epoch_us(sort_column) in columns."""

    table: str
    columns: str
    sort_column: str
    sort_index: int
    id_type: type[str] | type[int]
    convert: Callable[[Sequence[Any]], T]


RUNS = Listing("runs", RUN_COLUMNS, "opened_at", 4, str, run_row)
INCIDENTS = Listing("incidents", INCIDENT_COLUMNS, "last_failure_at", 7, int, incident_row)
NOTIFICATIONS = Listing("outbox", NOTIFICATION_COLUMNS, "created_at", 7, int, notification_row)
