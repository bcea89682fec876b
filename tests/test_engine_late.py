"""Late outcomes: expected outcomes that arrive after their run failed."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from outcomewatch.analyzer.engine import Engine
from outcomewatch.clock import ManualClock
from outcomewatch.model import LateOutcome, RunFailed
from tests.test_engine import IDLE, batch, make_engine, span

RULES = """
rules:
  - name: order-confirmed
    trigger: {span: order.placed}
    expect:
      - {span: payment.captured}
      - {span: email.sent}
"""


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def engine(tmp_path: Path, clock: ManualClock) -> Engine:
    return make_engine(tmp_path, RULES, clock)


def _failed(engine: Engine, clock: ManualClock, trace: bytes) -> RunFailed:
    engine.observe(batch(span(trace, "order.placed")))
    clock.advance(IDLE)
    (failed,) = engine.tick()
    assert isinstance(failed, RunFailed)
    return failed


def test_an_outcome_after_the_failure_is_reported_late(
    engine: Engine, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    failed = _failed(engine, clock, trace)
    clock.advance(timedelta(minutes=3))

    (late,) = engine.observe(batch(span(trace, "email.sent")))
    assert late == LateOutcome(failed.run_id, "order-confirmed", trace.hex(), "email.sent",
                               clock())


def test_each_late_expectation_is_reported_once(engine: Engine, clock: ManualClock) -> None:
    trace = os.urandom(16)
    _failed(engine, clock, trace)
    engine.observe(batch(span(trace, "email.sent")))

    assert engine.observe(batch(span(trace, "email.sent"))) == []
    assert [e.outcome for e in engine.observe(batch(span(trace, "payment.captured")))
            if isinstance(e, LateOutcome)] == ["payment.captured"]


def test_a_late_outcome_neither_passes_the_run_nor_opens_another(
    engine: Engine, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    _failed(engine, clock, trace)
    events = engine.observe(batch(span(trace, "payment.captured"), span(trace, "email.sent")))

    assert all(isinstance(e, LateOutcome) for e in events)
    assert engine.open_runs == 0


def test_an_outcome_in_another_trace_is_not_late_for_the_run(
    engine: Engine, clock: ManualClock
) -> None:
    _failed(engine, clock, os.urandom(16))
    assert engine.observe(batch(span(os.urandom(16), "email.sent"))) == []


def test_a_failed_run_is_forgotten_after_a_day(engine: Engine, clock: ManualClock) -> None:
    trace = os.urandom(16)
    _failed(engine, clock, trace)
    clock.advance(timedelta(hours=24, seconds=1))
    engine.tick()

    assert engine.observe(batch(span(trace, "email.sent"))) == []


def test_only_the_most_recent_ten_thousand_failed_runs_are_remembered(
    engine: Engine, clock: ManualClock
) -> None:
    traces = [os.urandom(16) for _ in range(10_001)]
    engine.observe(batch(*(span(trace, "order.placed") for trace in traces)))
    clock.advance(IDLE)
    assert len(engine.tick()) == 10_001

    assert engine.observe(batch(span(traces[0], "email.sent"))) == []
    assert [type(e) for e in engine.observe(batch(span(traces[1], "email.sent")))] == [
        LateOutcome]
