"""store/traces.py: where a trace's spans are, and when its newest one arrived, read through
the trace index and the unindexed tail of a real DuckDB file."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from outcomewatch.store import traces
from outcomewatch.store.schema import DDL

S = 1_000_000_000


def insert_span(db: duckdb.DuckDBPyConnection, trace_id: str, span_id: str, received: int) -> None:
    db.execute("INSERT INTO spans VALUES (?, ?, '', 'n', 's', '', 0, 0, 0, 0, '', ?, '', 1)",
               [trace_id, span_id, received])


@pytest.fixture
def db(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect(str(tmp_path / "t.duckdb"))
    conn.execute(DDL)
    # Indexed: trace a (received at 10 s and 20 s) and b (30 s); the index knows up to 30 s.
    for trace_id, span_id, received in [("a", "1", 10 * S), ("a", "2", 20 * S), ("b", "1", 30 * S)]:
        insert_span(conn, trace_id, span_id, received)
    conn.execute("INSERT INTO trace_index SELECT trace_id, min(received_ns), max(received_ns) "
                 "FROM spans GROUP BY trace_id")
    conn.execute("INSERT INTO trace_index_state VALUES (30000000000)")
    # The tail, not indexed yet: more of b, and c.
    insert_span(conn, "b", "2", 31 * S)
    insert_span(conn, "c", "1", 32 * S)
    return conn


@pytest.mark.parametrize("point_lookups", [32, 0])  # one index lookup per trace, or one scan
def test_the_newest_span_of_each_trace_from_its_window_and_the_tail(db, monkeypatch,
                                                                    point_lookups):
    monkeypatch.setattr(traces, "_POINT_LOOKUPS", point_lookups)
    assert traces.last_received(db, ["a", "b", "c", "d"]) == {"a": 20 * S, "b": 31 * S,
                                                              "c": 32 * S}
    assert traces.last_received(db, ["d"]) == {}


def test_a_trace_is_read_from_its_window_and_the_tail(db):
    assert traces.windows(db, "a") == [(10 * S, 20 * S), (30 * S - traces._TAIL_MARGIN_NS,
                                                          traces._MAX_NS)]
    rows = traces.span_rows(db, "b")
    assert rows is not None and [r[4] for r in rows] == ["1", "2"]


def test_a_batch_table_has_the_columns_of_the_spans_table_in_order(db):
    from outcomewatch.otlp import SPAN_COLUMNS

    columns = [row[0] for row in db.execute("DESCRIBE spans").fetchall()]
    assert columns == SPAN_COLUMNS.names  # the writer inserts by position (SELECT *)
