"""Bounded live state: held spans per trace, and budgets that evict the oldest traces."""

from __future__ import annotations

import os
import time
from pathlib import Path

from outcomewatch.clock import ManualClock
from outcomewatch.model import FailureReason, RunFailed, RunOpened, RunPassed
from tests.test_engine import IDLE, batch, make_engine, span

RULES = """
rules:
  - name: order-confirmed
    trigger: {span: order.placed}
    expect:
      - {span: payment.captured}
      - {span: email.sent}
  - name: big-job
    trigger: {span: job.start}
    expect:
      - {span: "db.*"}
      - {span: "row.*", after: trigger, count: {gte: 3}}
      - {span: "retry.*", count: {lte: 2}}
"""


def test_the_oldest_trace_is_evaluated_early_when_there_are_too_many(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, RULES, ManualClock(), max_live_traces=2)
    oldest, middle, newest = (os.urandom(16) for _ in range(3))
    engine.observe(batch(span(oldest, "order.placed"), span(oldest, "payment.captured")))
    engine.observe(batch(span(middle, "order.placed")))

    (opened, evicted) = engine.observe(batch(span(newest, "order.placed")))
    assert isinstance(opened, RunOpened)
    assert isinstance(evicted, RunFailed)
    assert (evicted.trace_id, evicted.reason) == (oldest.hex(), FailureReason.EVICTED)
    assert evicted.missing == ("email.sent",)
    assert (engine.live_traces, engine.evicted_traces) == (2, 1)


def test_traces_are_evicted_until_the_held_spans_fit_the_budget(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, RULES, ManualClock(), max_live_spans=3)
    first, second = os.urandom(16), os.urandom(16)
    engine.observe(batch(span(first, "order.placed"), span(first, "payment.captured")))
    events = engine.observe(batch(span(second, "order.placed"), span(second, "email.sent")))

    assert [e.trace_id for e in events if isinstance(e, RunFailed)] == [first.hex()]
    assert engine.held_spans == 2
    assert engine.evicted_traces == 1


def test_a_trace_without_runs_is_dropped_by_eviction_and_counted(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, RULES, ManualClock(), max_live_traces=1)
    engine.observe(batch(span(os.urandom(16), "payment.captured")))
    assert engine.observe(batch(span(os.urandom(16), "email.sent"))) == []
    assert (engine.live_traces, engine.evicted_traces) == (1, 1)


def test_without_a_budget_nothing_is_evicted(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, RULES, ManualClock())
    for _ in range(50):
        engine.observe(batch(span(os.urandom(16), "order.placed")))
    assert (engine.live_traces, engine.open_runs, engine.evicted_traces) == (50, 50, 0)


def test_a_trace_of_a_hundred_thousand_matching_spans_holds_a_bounded_few(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    engine = make_engine(tmp_path, RULES, clock)
    trace = os.urandom(16)
    start = time.time_ns()
    engine.observe(batch(span(trace, "job.start", start_ns=start)))
    held = []
    for b in range(100):
        spans = [span(trace, ("db.query", "row.write")[i % 2], start_ns=start + b * 1000 + i)
                 for i in range(1000)]
        # retry.* has an upper bound: no verdict before the trace goes idle.
        assert engine.observe(batch(*spans)) == []
        held.append(engine.held_spans)
        if b == 50:
            # A second trigger in the same trace: only rows that start after it count for it.
            engine.observe(batch(span(trace, "job.start", start_ns=start + b * 1000 + 500)))

    # Per selector: db.* one span, row.* (after: trigger, gte: 3) the three latest-starting;
    # plus the two triggers of the open runs.
    assert max(held) <= 1 + 3 + 2
    clock.advance(IDLE)
    assert [type(e) for e in engine.tick()] == [RunPassed, RunPassed]
