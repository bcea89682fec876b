"""Span retention: delete old spans in small transactions on the writer thread.

Two ages, by what the trace was worth:

- ``spans``: a trace whose runs all passed, or that opened no run at all, keeps its spans this
  long (``--retention``, default 14d);
- ``evidence``: a trace with a failed run (a row in ``incident_failures``: the incident's
  evidence) keeps its spans this long (``--evidence-retention``, default 90d). Incidents,
  failures, runs and their ``detail`` JSON are never deleted, only the raw spans.

Spans of a trace with an open run are never deleted: a restart replays them to judge the run.
Resources are kept too (a handful of rows; the writer caches which ids exist).

Ages are measured on ``received_ns`` (our clock when the span arrived, not the client's), which
is also the order spans are appended in, so DuckDB's per-row-group min/max lets every statement
here read only the row groups of its window. Each call to :func:`apply` walks from the oldest
span to the later cut-off in windows of at most ``max_rows`` stored spans, each deleted in its
own writer job (one transaction, shared with whatever ingest is queued), so ingest waits for at
most one window's delete. Freed blocks are reused by DuckDB after the next CHECKPOINT (the
writer checkpoints when idle); the file does not shrink.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from outcomewatch.clock import to_ns

if TYPE_CHECKING:
    import duckdb

    from outcomewatch.store.duckdb import Store

log = logging.getLogger(__name__)

MAX_ROWS = 50_000  # spans looked at (and so at most deleted) per transaction
_FIRST_WIDTH_NS = 60 * 1_000_000_000  # first window: one minute of received_ns
_MAX_WINDOWS = 1_000_000  # a bound on one walk that no real database reaches

# Traces that keep their spans whatever their age, and traces that are incident evidence.
_OPEN = "SELECT trace_id FROM runs WHERE status = 'open'"
_EVIDENCE = "SELECT trace_id FROM incident_failures UNION SELECT trace_id FROM runs " \
            "WHERE status = 'failed'"

_DELETE_PLAIN = (
    "DELETE FROM spans WHERE received_ns >= $lo AND received_ns < $hi AND received_ns < $cut "
    f"AND trace_id NOT IN ({_OPEN}) AND trace_id NOT IN ({_EVIDENCE})"
)
_DELETE_EVIDENCE = (
    "DELETE FROM spans WHERE received_ns >= $lo AND received_ns < $hi AND received_ns < $cut "
    f"AND trace_id NOT IN ({_OPEN}) AND trace_id IN ({_EVIDENCE})"
)


@dataclass(frozen=True, slots=True)
class Policy:
    """How long spans are kept: ``spans`` for passed or run-less traces, ``evidence`` for
    traces of failed runs. None keeps them forever."""

    spans: timedelta | None = timedelta(days=14)
    evidence: timedelta | None = timedelta(days=90)
    max_rows: int = MAX_ROWS

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ValueError("Policy.max_rows must be positive")


@dataclass(frozen=True, slots=True)
class Deleted:
    """Spans deleted by one :func:`apply`: of passed or run-less traces, and of evidence."""

    spans: int = 0
    evidence: int = 0
    windows: int = 0

    @property
    def total(self) -> int:
        return self.spans + self.evidence


@dataclass(frozen=True, slots=True)
class _Window:
    hi: int
    looked_at: int
    spans: int
    evidence: int


# A trace's index rows go with the spans of their window.
_DELETE_TRACES_PLAIN = (
    "DELETE FROM trace_index WHERE last_received_ns >= $lo AND last_received_ns < $hi "
    f"AND last_received_ns < $cut AND trace_id NOT IN ({_OPEN}) AND trace_id NOT IN ({_EVIDENCE})"
)
_DELETE_TRACES_EVIDENCE = (
    "DELETE FROM trace_index WHERE last_received_ns >= $lo AND last_received_ns < $hi "
    f"AND last_received_ns < $cut AND trace_id NOT IN ({_OPEN}) AND trace_id IN ({_EVIDENCE})"
)


def _count(db: duckdb.DuckDBPyConnection, lo: int, hi: int) -> int:
    # fetchall, never fetchone, on the writer: a result read only in part stays open, and the
    # next statement of the transaction fails with "connection has an unfinished result".
    rows = db.execute("SELECT count(*) FROM spans WHERE received_ns >= ? AND received_ns < ?",
                      [lo, hi]).fetchall()
    return int(rows[0][0]) if rows else 0


def _delete(db: duckdb.DuckDBPyConnection, statement: str, lo: int, hi: int,
            cut: int | None) -> int:
    if cut is None or cut <= lo:
        return 0
    rows = db.execute(statement, {"lo": lo, "hi": hi, "cut": cut}).fetchall()
    return int(rows[0][0]) if rows else 0


def delete_window(
    db: duckdb.DuckDBPyConnection, *, lo: int, width: int, end: int, spans_cut: int | None,
    evidence_cut: int | None, max_rows: int,
) -> _Window:
    """Delete the expired spans received in [lo, hi), where hi <= lo + width and <= end is
    narrowed until the window holds at most ``max_rows`` spans (or is 1 ns wide: the spans of
    one export share their received_ns). Runs inside the writer's transaction."""
    hi = min(lo + width, end)
    looked_at = _count(db, lo, hi)
    while looked_at > max_rows and hi - lo > 1:
        hi = lo + (hi - lo) // 2
        looked_at = _count(db, lo, hi)
    if looked_at == 0:
        return _Window(hi, 0, 0, 0)
    plain = _delete(db, _DELETE_PLAIN, lo, hi, spans_cut)
    evidence = _delete(db, _DELETE_EVIDENCE, lo, hi, evidence_cut)
    _delete(db, _DELETE_TRACES_PLAIN, lo, hi, spans_cut)
    _delete(db, _DELETE_TRACES_EVIDENCE, lo, hi, evidence_cut)
    return _Window(hi, looked_at, plain, evidence)


def _oldest(db: duckdb.DuckDBPyConnection, before: int) -> int | None:
    rows = db.execute("SELECT min(received_ns) FROM spans WHERE received_ns < ?",
                      [before]).fetchall()
    return None if not rows or rows[0][0] is None else int(rows[0][0])


async def apply(store: Store, policy: Policy, *, now: datetime) -> Deleted:
    """Delete every span past its retention at ``now``, one bounded window per transaction."""
    now_ns = to_ns(now)
    spans_cut = None if policy.spans is None else now_ns - _ns(policy.spans)
    evidence_cut = None if policy.evidence is None else now_ns - _ns(policy.evidence)
    cuts = [c for c in (spans_cut, evidence_cut) if c is not None]
    if not cuts:
        return Deleted()
    end = max(cuts)
    oldest = await store.run(lambda db: _oldest(db, end))
    if oldest is None:
        return Deleted()
    assert isinstance(oldest, int)
    lo, width = oldest, _FIRST_WIDTH_NS
    spans = evidence = windows = 0
    while lo < end and windows < _MAX_WINDOWS:
        window = await store.run(functools.partial(
            delete_window, lo=lo, width=width, end=end, spans_cut=spans_cut,
            evidence_cut=evidence_cut, max_rows=policy.max_rows))
        assert isinstance(window, _Window)
        windows += 1
        spans += window.spans
        evidence += window.evidence
        # Widen over sparse stretches (gaps in traffic, mostly-deleted ranges), narrow to what
        # the last window could hold.
        if window.looked_at <= policy.max_rows // 4:
            width = min(2 * (window.hi - lo), 1 << 62)
        else:
            width = max(window.hi - lo, 1)
        lo = window.hi
    if spans or evidence:
        log.info("retention: deleted %d spans of passed traces and %d of incident evidence "
                 "in %d windows", spans, evidence, windows)
    return Deleted(spans, evidence, windows)


def _ns(delta: timedelta) -> int:
    return int(delta / timedelta(microseconds=1)) * 1_000


__all__ = ["MAX_ROWS", "Deleted", "Policy", "apply", "delete_window"]
