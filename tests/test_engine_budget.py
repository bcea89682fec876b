"""Bounded live state: held spans per trace, and budgets that evict the oldest traces."""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from outcomewatch.analyzer.engine import Engine
from outcomewatch.clock import ManualClock
from outcomewatch.model import FailureReason, RunFailed, RunOpened, RunPassed
from outcomewatch.rules import load_rules
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


# -- the byte budget (max_live_bytes) ---------------------------------------------------------

HOLDING_RULES = """
rules:
  - name: report-delivered
    trigger: {span: report.run}
    expect: [{span: report.delivered}]
    within: 2h
"""


def test_the_byte_budget_evicts_the_oldest_traces_and_counts_them(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, HOLDING_RULES, ManualClock())
    first = os.urandom(16)
    engine.observe(batch(span(first, "report.run")))
    one_trace = engine.live_bytes
    budgeted = make_engine(tmp_path, HOLDING_RULES, ManualClock(),
                           max_live_bytes=int(2.5 * one_trace))
    traces = [os.urandom(16) for _ in range(4)]
    evicted = []
    for trace in traces:
        evicted += [e for e in budgeted.observe(batch(span(trace, "report.run")))
                    if isinstance(e, RunFailed)]
    assert [(e.trace_id, e.reason) for e in evicted] == [
        (traces[0].hex(), FailureReason.EVICTED), (traces[1].hex(), FailureReason.EVICTED)]
    assert (budgeted.live_traces, budgeted.evicted_traces) == (2, 2)
    assert budgeted.live_bytes <= int(2.5 * one_trace)


def test_a_large_held_span_weighs_its_size_in_the_budget(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, HOLDING_RULES, ManualClock())
    small, large = os.urandom(16), os.urandom(16)
    engine.observe(batch(span(small, "report.delivered", note="x")))
    small_bytes = engine.live_bytes
    engine.observe(batch(span(large, "report.delivered", note="x" * 50_000)))
    assert engine.live_bytes - small_bytes > 50_000
    budgeted = make_engine(tmp_path, HOLDING_RULES, ManualClock(), max_live_bytes=30_000)
    budgeted.observe(batch(span(small, "report.delivered", note="x")))
    budgeted.observe(batch(span(large, "report.delivered", note="x" * 50_000)))
    # Over the budget even alone: evicted too, as the oldest once the small one is gone.
    assert (budgeted.live_traces, budgeted.evicted_traces, budgeted.live_bytes) == (0, 2, 0)


def test_live_bytes_returns_to_zero_once_every_trace_is_decided_and_forgotten(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    engine = make_engine(tmp_path, RULES + """
  - name: slow
    trigger: {span: slow.start}
    expect: [{span: slow.done}]
    within: 1h
""", clock)
    for _ in range(20):
        trace = os.urandom(16)
        engine.observe(batch(span(trace, "order.placed"), span(trace, "payment.captured"),
                             span(trace, "job.start"), span(trace, "row.a"),
                             span(trace, "retry.x"), span(trace, "slow.done")))
        engine.observe(batch(span(trace, "slow.start"), span(trace, "email.sent")))
    assert engine.live_bytes > 0
    clock.advance(timedelta(hours=2))
    engine.tick()
    clock.advance(timedelta(hours=2))
    engine.tick()
    assert (engine.live_traces, engine.held_spans, engine.live_bytes) == (0, 0, 0)


STORY = {"event.type": "invoice.payment_failed", "email.template": "payment_failed",
         "customer.id": "cus_00000001"}


def _traced_bytes(make: Callable[[], object]) -> tuple[object, int]:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        made = make()
        gc.collect()
        return made, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["email.delivered", "stripe.webhook"],
                         ids=["outcome only", "open run"])
def test_a_live_trace_costs_at_most_a_kibibyte_beyond_its_held_spans_and_is_estimated_so(
    name: str,
) -> None:
    """The engine's own state per live trace, measured with tracemalloc as bench/bench_memory.py
    does (the spans decoded beforehand, so not counted), and the estimate the budget uses."""
    rules = load_rules([Path(__file__).parent.parent / "rules" / "examples"])
    now, count = time.time_ns(), 2_000
    batches = [batch(span(os.urandom(16), name, attrs=STORY)) for _ in range(count)]
    spans, span_bytes = _traced_bytes(lambda: [(b.decode(0), now) for b in batches])
    engine = Engine(rules, idle=IDLE, clock=ManualClock())
    # The events are dropped (len): only what the engine keeps is measured.
    _, state = _traced_bytes(lambda: len(engine.replay(spans)))  # type: ignore[arg-type]
    assert engine.live_traces == count
    assert state / count <= 1024
    assert 0.75 <= engine.live_bytes / (state + span_bytes) <= 1.33
