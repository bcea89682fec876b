"""Finding a trace's spans without scanning the table.

Trace ids are random, so a ``WHERE trace_id = ?`` alone reads every row group. The ``traces``
table (one row per trace, upserted at ingest) keeps the window of ``received_ns`` a trace's spans
were stored in; spans are appended in received order, so bounding the span query by that window
lets DuckDB skip every row group outside it by its min/max. Two point reads, milliseconds among
millions of spans.
"""

from __future__ import annotations

from typing import Any

import duckdb

_MAX_NS = 2**63 - 1


def window(cur: duckdb.DuckDBPyConnection, trace_id: str) -> tuple[int, int] | None:
    """The (first, last) received_ns of the trace's stored spans, or None when none is."""
    row = cur.execute("SELECT first_received_ns, last_received_ns FROM traces WHERE trace_id = ?",
                      [trace_id]).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def span_rows(
    cur: duckdb.DuckDBPyConnection, trace_id: str, *, until_ns: int | None = None,
    limit: int | None = None, after: tuple[int, str] | None = None,
) -> list[tuple[Any, ...]] | None:
    """(span, resource, scope, start_ns, span_id) of each stored span of the trace, once (a
    retried export stored it twice: the first copy wins), ordered by (start_ns, span_id); only
    spans received up to ``until_ns``; ``limit`` rows after the keyset ``after``. None when no
    span of the trace is stored."""
    bounds = window(cur, trace_id)
    if bounds is None:
        return None
    lo, hi = bounds
    if until_ns:
        hi = min(hi, until_ns)
    sql = (
        "SELECT s.span, r.resource, s.scope, s.start_ns, s.span_id FROM spans s "
        "JOIN resources r ON r.id = s.resource_id "
        "WHERE s.received_ns BETWEEN ? AND ? AND s.trace_id = ? "
        "QUALIFY row_number() OVER (PARTITION BY s.span_id ORDER BY s.received_ns) = 1"
    )
    params: list[object] = [lo, hi, trace_id]
    if after is not None:
        sql = f"SELECT * FROM ({sql}) WHERE (start_ns, span_id) > (?, ?)"
        params += [after[0], after[1]]
    sql += " ORDER BY start_ns, span_id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    rows = cur.execute(sql, params).fetchall()
    if not rows and after is None:
        return None  # the row outlived its spans (retention deletes it with its newest span)
    return rows
