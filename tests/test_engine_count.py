"""count, after: trigger, duration and max_duration."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from outcomewatch.analyzer.engine import Engine
from outcomewatch.clock import ManualClock
from outcomewatch.model import FailureReason, RunFailed, RunOpened, RunPassed
from tests.test_engine import IDLE, batch, make_engine, span

RULES = """
rules:
  - name: charged-once
    trigger: {span: checkout.submit}
    expect:
      - {span: payment.charge, status: ok, count: {gte: 1, lte: 1}}
    within: 15m
  - name: tried-twice
    trigger: {span: job.start}
    expect:
      - {span: job.attempt, count: {gte: 2}}
  - name: at-most-one-warning
    trigger: {span: render.start}
    expect:
      - {span: render.warning, count: {lte: 1}}
  - name: note-optional
    trigger: {span: note.start}
    expect:
      - {span: note.extra, count: {gte: 0}}
      - {span: note.done}
  - name: charge-after-retry
    trigger: {span: retry.submit}
    expect:
      - {span: retry.charge, after: trigger}
  - name: quick
    trigger: {span: quick.start}
    expect:
      - {span: quick.step, duration: {lt: 1s}}
      - {span: quick.end}
    max_duration: 5m
"""
MINUTE = 60 * 10**9


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def engine(tmp_path: Path, clock: ManualClock) -> Engine:
    return make_engine(tmp_path, RULES, clock)


def test_an_upper_bound_keeps_a_met_run_open_until_its_deadline(
    engine: Engine, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    events = engine.observe(batch(span(trace, "checkout.submit"),
                                  span(trace, "payment.charge", ok=True)))
    assert [type(e) for e in events] == [RunOpened]
    clock.advance(timedelta(minutes=15, seconds=1))

    assert [type(e) for e in engine.tick()] == [RunPassed]


def test_a_match_beyond_the_upper_bound_fails_the_run_at_once(engine: Engine) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "checkout.submit"), span(trace, "payment.charge", ok=True)))
    second = span(trace, "payment.charge", ok=True)

    (failed,) = engine.observe(batch(second))
    assert isinstance(failed, RunFailed)
    assert failed.reason is FailureReason.COUNT
    assert [s.span_id for s in failed.offending] == [second.span_id.hex()]
    assert failed.missing == ()


def test_the_same_span_sent_twice_counts_once(engine: Engine, clock: ManualClock) -> None:
    trace = os.urandom(16)
    charge = span(trace, "payment.charge", ok=True)
    engine.observe(batch(span(trace, "checkout.submit"), charge))
    assert engine.observe(batch(charge)) == []
    clock.advance(timedelta(minutes=16))
    assert [type(e) for e in engine.tick()] == [RunPassed]


def test_a_run_with_an_upper_bound_and_no_within_passes_when_its_trace_goes_idle(
    engine: Engine, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    assert [type(e) for e in engine.observe(batch(span(trace, "render.start")))] == [RunOpened]
    clock.advance(IDLE)
    assert [type(e) for e in engine.tick()] == [RunPassed]


def test_a_count_with_only_an_upper_bound_fails_on_one_too_many(engine: Engine) -> None:
    trace = os.urandom(16)
    events = engine.observe(batch(span(trace, "render.start"), span(trace, "render.warning"),
                                  span(trace, "render.warning")))
    assert [type(e) for e in events] == [RunOpened, RunFailed]


def test_gte_needs_that_many_distinct_spans(engine: Engine) -> None:
    trace = os.urandom(16)
    first = span(trace, "job.attempt")
    assert [type(e) for e in engine.observe(batch(span(trace, "job.start"), first))] == [
        RunOpened]
    assert engine.observe(batch(first)) == []
    assert [type(e) for e in engine.observe(batch(span(trace, "job.attempt")))] == [RunPassed]


def test_an_expectation_with_gte_zero_is_optional(engine: Engine) -> None:
    trace = os.urandom(16)
    events = engine.observe(batch(span(trace, "note.start"), span(trace, "note.done")))
    assert [type(e) for e in events] == [RunOpened, RunPassed]


def test_after_trigger_ignores_outcomes_that_started_before_the_trigger(
    engine: Engine, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    start = time.time_ns()
    engine.observe(batch(span(trace, "retry.charge", start_ns=start - 1),
                         span(trace, "retry.submit", start_ns=start)))
    clock.advance(IDLE)

    (failed,) = engine.tick()
    assert isinstance(failed, RunFailed)
    assert failed.missing == ("retry.charge",)


def test_after_trigger_counts_an_outcome_that_starts_with_the_trigger(engine: Engine) -> None:
    trace = os.urandom(16)
    start = time.time_ns()
    events = engine.observe(batch(span(trace, "retry.charge", start_ns=start),
                                  span(trace, "retry.submit", start_ns=start)))
    assert [type(e) for e in events] == [RunOpened, RunPassed]


def test_after_trigger_keeps_the_latest_outcomes_for_a_trigger_still_to_come(
    engine: Engine,
) -> None:
    trace = os.urandom(16)
    start = time.time_ns()
    engine.observe(batch(*(span(trace, "retry.charge", start_ns=start + i) for i in range(5))))
    events = engine.observe(batch(span(trace, "retry.submit", start_ns=start + 3)))
    assert [type(e) for e in events] == [RunOpened, RunPassed]


def test_a_span_outside_the_duration_bounds_does_not_count(
    engine: Engine, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "quick.start"), span(trace, "quick.end"),
                         span(trace, "quick.step", duration=timedelta(seconds=2))))
    clock.advance(IDLE)

    (failed,) = engine.tick()
    assert isinstance(failed, RunFailed)
    assert failed.missing == ("quick.step",)


def test_outcomes_that_end_after_max_duration_fail_the_run_instead_of_passing(
    engine: Engine,
) -> None:
    trace = os.urandom(16)
    start = time.time_ns()
    events = engine.observe(batch(
        span(trace, "quick.start", start_ns=start),
        span(trace, "quick.step", start_ns=start + MINUTE),
        span(trace, "quick.end", start_ns=start + 5 * MINUTE + 1),
    ))
    assert [type(e) for e in events] == [RunOpened, RunFailed]
    assert isinstance(events[1], RunFailed)
    assert events[1].reason is FailureReason.MAX_DURATION
    assert events[1].missing == ()


def test_outcomes_that_end_within_max_duration_pass(engine: Engine) -> None:
    trace = os.urandom(16)
    start = time.time_ns()
    events = engine.observe(batch(
        span(trace, "quick.start", start_ns=start),
        span(trace, "quick.step", start_ns=start + MINUTE),
        span(trace, "quick.end", start_ns=start + 4 * MINUTE, duration=timedelta(minutes=1)),
    ))
    assert [type(e) for e in events] == [RunOpened, RunPassed]
