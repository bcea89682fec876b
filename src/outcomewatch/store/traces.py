"""Finding a trace's spans without scanning the table.

Trace ids are random, so a ``WHERE trace_id = ?`` alone reads every row group. ``trace_index``
(store/schema.py) keeps the window of ``received_ns`` each trace's spans were stored in, and
spans are appended in received order, so the span query bounded by that window reads only the
row groups inside it. The spans committed since the index was last written (under a second of
traffic) are found by a scan of that short tail. Three small reads: milliseconds among millions
of spans.
"""

from __future__ import annotations

import time
from typing import Any

import duckdb
import pyarrow as pa

from outcomewatch.otlp import SpanBatch

_MAX_NS = 2**63 - 1
INDEX_EVERY_S = 0.5  # how often the writer appends to trace_index
_INDEX_SCHEMA = pa.schema([("trace_id", pa.string()), ("first_received_ns", pa.int64()),
                           ("last_received_ns", pa.int64())])


class PendingIndex:
    """The writer's trace windows not yet in trace_index: ``add`` each committed batch (a few
    dict lookups per trace: the spans of one trace sit together in a request), ``write`` them
    in the current transaction when ``due``. Spans committed before their index rows are found
    by the tail scan; if a write rolls back, a start re-indexes the tail (schema.reindex_tail)."""

    def __init__(self) -> None:
        self._windows: dict[str, list[int]] = {}  # trace id -> [first, last] received_ns
        self._written_at = time.monotonic()

    def __bool__(self) -> bool:
        return bool(self._windows)

    def add(self, batch: SpanBatch) -> None:
        windows, received = self._windows, batch.received_ns
        for trace_id in batch.trace_ids():
            window = windows.get(trace_id)
            if window is None:
                windows[trace_id] = [received, received]
            elif received > window[1]:
                window[1] = received
            elif received < window[0]:
                window[0] = received

    def due(self) -> bool:
        """Windows are waiting, the oldest for longer than INDEX_EVERY_S."""
        return bool(self._windows) and time.monotonic() - self._written_at > INDEX_EVERY_S

    def write(self, cur: duckdb.DuckDBPyConnection) -> None:
        self._written_at = time.monotonic()
        if not self._windows:
            return
        windows, self._windows = self._windows, {}
        table = pa.Table.from_arrays(
            [list(windows), [w[0] for w in windows.values()], [w[1] for w in windows.values()]],
            schema=_INDEX_SCHEMA)
        cur.register("incoming_index", table)
        try:
            cur.execute("INSERT INTO trace_index SELECT * FROM incoming_index")
        finally:
            cur.unregister("incoming_index")
        cur.execute("UPDATE trace_index_state SET indexed_until = greatest(indexed_until, ?)",
                    [max(w[1] for w in windows.values())])
# The tail is read from a little before the newest indexed span. The server stamps received_ns
# in commit order (pipeline.py), so its spans never cross; the margin is for spans stored by
# anything else (a test, an import) with times of their own.
_TAIL_MARGIN_NS = 200_000_000

# The span columns of a trace, bounded by its windows: (lo, hi) pairs of received_ns, OR-ed
# (one scan that skips every row group outside them). Resources are looked up apart: a join
# costs more than the scan, and a handful of resources serve every span.
_SPANS = ("SELECT span, resource_id, scope, start_ns, span_id, received_ns FROM spans "
          "WHERE ({windows}) AND trace_id = ?")
_RESOURCE = "SELECT resource FROM resources WHERE id = ?"
# Resource rows are content-addressed (id = hash of the bytes) and never change: cached.
_resources: dict[int, bytes] = {}
_MAX_CACHED_RESOURCES = 10_000


def _tail_start(indexed_until: int | None) -> int:
    """Where the unindexed tail of the spans table starts (all of it, if nothing is indexed)."""
    return -(2**63) if indexed_until is None else int(indexed_until) - _TAIL_MARGIN_NS


def windows(cur: duckdb.DuckDBPyConnection, trace_id: str) -> list[tuple[int, int]]:
    """The received_ns ranges to read for the trace: its indexed window (if any) and the
    unindexed tail."""
    [(lo, hi, indexed_until)] = cur.execute(
        "SELECT min(first_received_ns), max(last_received_ns), "
        "(SELECT max(indexed_until) FROM trace_index_state) FROM trace_index "
        "WHERE trace_id = ?", [trace_id]).fetchall()
    tail = _tail_start(indexed_until)
    if lo is None:
        return [(tail, _MAX_NS)]
    if int(hi) >= tail:
        return [(int(lo), _MAX_NS)]
    return [(int(lo), int(hi)), (tail, _MAX_NS)]


_POINT_LOOKUPS = 32  # up to this many traces, one index lookup each beats a scan of the index


def last_received(cur: duckdb.DuckDBPyConnection, trace_ids: list[str]) -> dict[str, int]:
    """The newest received_ns among each trace's stored spans (a trace with none is left out):
    its indexed window, and the unindexed tail (the last moment's spans)."""
    [(indexed_until,)] = cur.execute(
        "SELECT max(indexed_until) FROM trace_index_state").fetchall()
    tail = _tail_start(indexed_until)
    if len(trace_ids) <= _POINT_LOOKUPS:
        indexed = [(t, cur.execute("SELECT max(last_received_ns) FROM trace_index "
                                   "WHERE trace_id = ?", [t]).fetchall()[0][0])
                   for t in trace_ids]
    else:
        indexed = cur.execute("SELECT trace_id, max(last_received_ns) FROM trace_index "
                              "WHERE list_contains(?, trace_id) GROUP BY trace_id",
                              [trace_ids]).fetchall()
    recent = cur.execute("SELECT trace_id, max(received_ns) FROM spans WHERE received_ns >= ? "
                         "AND list_contains(?, trace_id) GROUP BY trace_id",
                         [tail, trace_ids]).fetchall()
    last: dict[str, int] = {}
    for trace_id, ns in [*indexed, *recent]:
        if ns is not None:
            last[trace_id] = max(int(ns), last.get(trace_id, int(ns)))
    return last


def resource_bytes(cur: duckdb.DuckDBPyConnection, resource_id: int) -> bytes:
    """The stored Resource of ``resource_id`` (b"", an empty resource, if none is stored)."""
    raw = _resources.get(resource_id)
    if raw is None:
        rows = cur.execute(_RESOURCE, [resource_id]).fetchall()
        raw = bytes(rows[0][0]) if rows else b""
        if len(_resources) >= _MAX_CACHED_RESOURCES:
            _resources.clear()
        _resources[resource_id] = raw
    return raw


def span_rows(
    cur: duckdb.DuckDBPyConnection, trace_id: str, *, until_ns: int | None = None,
    limit: int | None = None, after: tuple[int, str] | None = None,
) -> list[tuple[Any, ...]] | None:
    """(span, resource, scope, start_ns, span_id) of each stored span of the trace, once (a
    retried export stored it twice: the first copy wins), ordered by (start_ns, span_id); only
    spans received up to ``until_ns``; ``limit`` rows after the keyset ``after``. None when no
    span of the trace is stored."""
    bounds = [(lo, min(hi, until_ns) if until_ns else hi) for lo, hi in windows(cur, trace_id)]
    bounds = [(lo, hi) for lo, hi in bounds if lo <= hi]
    if not bounds:
        return None
    sql = _SPANS.format(windows=" OR ".join(["received_ns BETWEEN ? AND ?"] * len(bounds)))
    first: dict[str, tuple[Any, ...]] = {}
    for row in cur.execute(sql, [*(x for b in bounds for x in b), trace_id]).fetchall():
        kept = first.get(row[4])
        if kept is None or row[5] < kept[5]:
            first[row[4]] = row
    if not first:
        return None
    rows = sorted(first.values(), key=lambda r: (r[3], r[4]))
    if after is not None:
        rows = [r for r in rows if (r[3], r[4]) > after]
    if limit is not None:
        rows = rows[:limit]
    return [(r[0], resource_bytes(cur, r[1]), r[2], r[3], r[4]) for r in rows]
