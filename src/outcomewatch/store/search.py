"""Search: "what happened to customer X?" in one query.

The index is the ``run_keys`` table (store/schema.py), written with each run from its trigger's
attribute values (and the evidence values of failed runs), so a search never decodes a span.
A query that is a trace id (32 lowercase hex characters) finds that trace and its runs; any
other query finds the runs with a key whose value equals it exactly, newest first, paginated
like every other listing (keyset on ``opened_at, id``; cursors from queries.encode_cursor).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from outcomewatch.store.queries import Reader
from outcomewatch.store.rows import (
    RUN_COLUMNS,
    Page,
    RunRow,
    decode_cursor,
    encode_cursor,
    run_row,
)

TRACE_ID = re.compile(r"[0-9a-f]{32}")
MAX_QUERY = 512  # longer than any stored value (model.MAX_SEARCH_VALUE): it cannot match


@dataclass(frozen=True, slots=True)
class SearchResult:
    """``trace_id`` is set when the query is a trace id with stored spans or runs; ``runs`` are
    the matching runs (for a trace id: the runs it opened), ``keys`` the attribute keys whose
    value matched, per run id."""

    query: str
    trace_id: str | None
    runs: Page[RunRow]
    keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def is_trace_id(query: str) -> bool:
    return TRACE_ID.fullmatch(query) is not None


def search(reader: Reader, query: str, *, limit: int, cursor: str | None = None) -> SearchResult:
    """Runs found by ``query`` (surrounding whitespace ignored). Raises InvalidCursor for a bad
    cursor and ValueError for a limit below 1, like the listings."""
    query = query.strip()
    if is_trace_id(query):
        runs = reader.list_runs(trace_id=query, rule=None, status=None, limit=limit,
                                cursor=cursor)
        [spans] = reader.fetch(("SELECT 1 FROM spans WHERE trace_id = ? LIMIT 1", [query]))
        found = bool(spans) or bool(runs.items)
        return SearchResult(query, query if found else None, runs)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if not query or len(query) > MAX_QUERY:
        return SearchResult(query, None, Page((), None))
    where = "id IN (SELECT run_id FROM run_keys WHERE value = ?)"
    params: list[object] = [query]
    if cursor is not None:
        at_us, last_id = decode_cursor(cursor, str)
        where += (" AND opened_at <= make_timestamptz(?)"
                  " AND (opened_at, id) < (make_timestamptz(?), ?)")
        params += [at_us, at_us, last_id]
    [rows] = reader.fetch((
        f"SELECT {RUN_COLUMNS} FROM runs WHERE {where} ORDER BY opened_at DESC, id DESC LIMIT ?",
        [*params, limit + 1],
    ))
    page_rows = rows[:limit]
    next_cursor = encode_cursor(rows[limit - 1][4], rows[limit - 1][0]) if len(rows) > limit \
        else None
    keys: dict[str, list[str]] = {}
    if page_rows:
        ids = [row[0] for row in page_rows]
        [matched] = reader.fetch((
            "SELECT DISTINCT run_id, key FROM run_keys WHERE value = ? AND run_id IN "
            f"({', '.join('?' for _ in ids)}) ORDER BY run_id, key",
            [query, *ids],
        ))
        for run_id, key in matched:
            keys.setdefault(run_id, []).append(key)
    return SearchResult(
        query, None, Page(tuple(run_row(row) for row in page_rows), next_cursor),
        {run_id: tuple(found) for run_id, found in keys.items()},
    )
