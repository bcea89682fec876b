"""forbid: a matching span in the run's trace fails the run at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from outcomewatch.analyzer.engine import Engine
from outcomewatch.clock import ManualClock
from outcomewatch.model import FailureReason, RunFailed, RunOpened, RunPassed
from tests.test_engine import batch, make_engine, span

RULES = """
rules:
  - name: report-delivered
    trigger: {span: report.generate, status: ok}
    expect:
      - {span: email.delivered, status: ok}
      - {span: audit.logged}
    forbid:
      - {span: email.send, status: error}
    within: 30m
"""


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return make_engine(tmp_path, RULES, ManualClock())


def test_a_forbidden_span_fails_the_open_run_at_once(engine: Engine) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "report.generate", ok=True)))
    bad = span(trace, "email.send", error=True)

    (failed,) = engine.observe(batch(span(trace, "audit.logged"), bad))
    assert isinstance(failed, RunFailed)
    assert failed.reason is FailureReason.FORBIDDEN
    assert [s.span_id for s in failed.offending] == [bad.span_id.hex()]
    assert failed.missing == ("email.delivered",)
    assert engine.open_runs == 0


def test_a_forbidden_span_sent_before_the_trigger_fails_the_run_when_it_opens(
    engine: Engine,
) -> None:
    trace = os.urandom(16)
    assert engine.observe(batch(span(trace, "email.send", error=True))) == []

    events = engine.observe(batch(span(trace, "report.generate", ok=True)))
    assert [type(e) for e in events] == [RunOpened, RunFailed]
    assert isinstance(events[1], RunFailed)
    assert events[1].reason is FailureReason.FORBIDDEN


def test_a_forbidden_span_wins_over_outcomes_that_were_all_seen(engine: Engine) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "email.send", error=True),
                         span(trace, "email.delivered", ok=True), span(trace, "audit.logged")))

    events = engine.observe(batch(span(trace, "report.generate", ok=True)))
    assert [type(e) for e in events] == [RunOpened, RunFailed]


def test_a_span_that_does_not_match_the_whole_forbid_selector_changes_nothing(
    engine: Engine,
) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "report.generate", ok=True)))
    assert engine.observe(batch(span(trace, "email.send", ok=True))) == []
    assert engine.open_runs == 1


def test_a_forbidden_span_in_another_trace_does_not_fail_the_run(engine: Engine) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "report.generate", ok=True)))
    assert engine.observe(batch(span(os.urandom(16), "email.send", error=True))) == []
    assert engine.open_runs == 1


def test_a_forbidden_span_after_the_run_passed_changes_nothing(engine: Engine) -> None:
    trace = os.urandom(16)
    events = engine.observe(batch(span(trace, "report.generate", ok=True),
                                  span(trace, "email.delivered", ok=True),
                                  span(trace, "audit.logged")))
    assert [type(e) for e in events] == [RunOpened, RunPassed]
    assert engine.observe(batch(span(trace, "email.send", error=True))) == []


def test_a_forbidden_span_alone_is_held_for_a_trigger_still_to_come(engine: Engine) -> None:
    engine.observe(batch(span(os.urandom(16), "email.send", error=True)))
    assert engine.live_traces == 1
    assert engine.held_spans == 1
