"""A restart reads again every span whose consequences the last process may not have stored.

The pipeline stamps received_ns in commit order and writes a watermark with each verdict batch
(pipeline.py): everything stamped before it was observed and its runs and verdicts stored. Here
a real Store on a DuckDB file, an injected clock, and a "kill -9" made exact: the spans are
committed (the writer drained) but the pipeline's pending events are dropped with it, as a
process killed between an export's commit and the next tick's verdict write would lose them.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from outcomewatch.clock import ManualClock
from outcomewatch.store.duckdb import Store
from outcomewatch.store.schema import DDL, migrate
from tests.test_server_ordering import IDLE, Harness

WELCOME = """
rules:
  - name: signup-welcomed
    owner: growth
    trigger: {span: user.signup}
    expect: [{span: welcome.sent}]
"""


def crash(h: Harness) -> None:
    """Drain the writer (every queued span committed), then drop what the pipeline holds."""
    assert h.server.store is not None
    h.loop.run_until_complete(h.server.store.run(lambda db: None))
    h.pipeline._pending.clear()  # the verdicts a kill -9 loses with the process
    h.close()


def restart(tmp_path: Path, clock: ManualClock) -> Harness:
    h = Harness(tmp_path, WELCOME, clock)
    h.loop.run_until_complete(h.pipeline.recover(IDLE))
    return h


def runs(h: Harness) -> list[tuple[str, str]]:
    return [(str(t), str(s)) for t, s in h.rows("SELECT trace_id, status FROM runs ORDER BY 1")]


def test_a_trigger_whose_run_was_never_written_is_judged_after_a_restart_much_later(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    first = Harness(tmp_path, WELCOME, clock)
    first.pipeline.tick()  # a watermark written: nothing observed yet
    first.ingest((1, 1, "user.signup"))  # committed; its run's opening only pending
    # Traffic goes on far past the idle time (a verdict write lagging behind the spans, as a
    # stalled loop or a long writer queue makes it), and the process dies before the next tick.
    clock.advance(IDLE * 5)
    first.ingest((2, 1, "page.view"))
    crash(first)

    second = restart(tmp_path, clock)
    assert second.server.engine.open_runs == 1
    second.tick_after(IDLE + timedelta(seconds=1))
    second.settle()
    assert runs(second) == [(f"{1:032x}", "failed")]
    second.close()


def test_a_file_where_no_watermark_was_ever_written_is_read_again_whole(tmp_path: Path) -> None:
    clock = ManualClock()
    first = Harness(tmp_path, WELCOME, clock)
    first.ingest((1, 1, "user.signup"))
    clock.advance(IDLE * 5)
    first.ingest((2, 1, "page.view"))
    crash(first)

    second = restart(tmp_path, clock)
    assert second.server.engine.open_runs == 1
    second.close()


def test_the_watermark_advances_on_quiet_traffic_so_a_restart_reads_only_the_last_moments(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    first = Harness(tmp_path, WELCOME, clock)
    for trace in range(1, 61):  # a minute of spans no rule looks at, ticked every second
        first.ingest((trace, 1, "page.view"))
        first.tick_after(timedelta(seconds=1))
    crash(first)

    second = Harness(tmp_path, WELCOME, clock)
    store = second.server.store
    assert store is not None
    read: list[int] = []

    def recovery_spans(since_ns: int, **kwargs: Any) -> list[tuple[bytes, bytes, str, int, str]]:
        rows = Store.recovery_spans(store, since_ns, **kwargs)
        read.append(len(rows))
        return rows

    store.recovery_spans = recovery_spans  # type: ignore[method-assign]
    second.loop.run_until_complete(second.pipeline.recover(IDLE))
    # Read again: the spans of the idle time before the watermark (one a second, and up to a
    # second more for a watermark not rewritten yet), not the whole minute.
    assert read and 1 <= read[0] <= IDLE.total_seconds() + 2
    second.close()


def test_received_ns_grows_in_commit_order_even_when_the_clock_goes_back(tmp_path: Path) -> None:
    clock = ManualClock()
    h = Harness(tmp_path, WELCOME, clock)
    h.ingest((1, 1, "page.view"))
    clock.advance(-timedelta(seconds=30))  # NTP stepped the clock back
    h.ingest((2, 1, "page.view"))
    h.ingest((3, 1, "page.view"))
    h.settle()
    stamps = [int(r) for (r,) in h.rows("SELECT received_ns FROM spans ORDER BY trace_id")]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3
    h.close()


def test_a_failed_commit_does_not_hold_the_watermark_back(tmp_path: Path) -> None:
    h = Harness(tmp_path, WELCOME)
    assert h.server.store is not None

    async def refuse(batch: object) -> None:
        raise RuntimeError("disk full")

    h.server.store.append_spans = refuse  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        h.ingest((1, 1, "user.signup"))
    assert h.pipeline._in_flight == set()
    assert h.pipeline.watermark() == h.pipeline._next_stamp
    h.close()


def test_a_file_from_before_the_watermark_is_taken_as_observed_up_to_its_last_span(
    tmp_path: Path,
) -> None:
    conn = duckdb.connect(str(tmp_path / "old.duckdb"))
    conn.execute(DDL)  # as an open makes it on an old file: verdict_state created, empty
    conn.execute("INSERT INTO spans (trace_id, span_id, parent_span_id, name, service, scope, "
                 "kind, start_ns, end_ns, status_code, status_message, received_ns, span, "
                 "resource_id) VALUES ('t', 's', '', 'n', 'svc', '', 1, 0, 0, 0, '', 1234, "
                 "''::BLOB, 0)")
    migrate(conn)
    migrate(conn)  # idempotent
    assert conn.execute("SELECT * FROM verdict_state").fetchall() == [(1234,)]
    conn.close()
