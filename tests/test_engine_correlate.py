"""correlate: outcomes from other traces, by shared values or by span links."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from outcomewatch.analyzer.engine import Engine
from outcomewatch.clock import ManualClock
from outcomewatch.model import LateOutcome, RunFailed, RunOpened, RunPassed
from tests.test_engine import batch, make_engine, span

RULES = """
rules:
  - name: subscription-provisioned
    trigger: {span: billing.webhook}
    expect:
      - {span: provisioning.job, status: ok}
    correlate: {by: [tenant.id, subscription.id]}
    within: 10m
  - name: same-trace-only
    trigger: {span: local.request}
    expect: [{span: local.done}]
    within: 10m
"""
KEYS: dict[str, Any] = {"tenant.id": "t1", "subscription.id": "s1"}


def job(**options: Any) -> Span:
    """A provisioning job's outcome span, in a trace of its own."""
    return span(os.urandom(16), "provisioning.job", ok=True, **options)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def engine(tmp_path: Path, clock: ManualClock) -> Engine:
    return make_engine(tmp_path, RULES, clock)


def test_an_outcome_in_another_trace_with_the_same_values_passes_the_run(
    engine: Engine,
) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "billing.webhook", attrs=KEYS)))

    (passed,) = engine.observe(batch(job(attrs=KEYS)))
    assert isinstance(passed, RunPassed)
    assert passed.trace_id == trace.hex()


def test_an_outcome_with_one_value_different_does_not_count(engine: Engine) -> None:
    engine.observe(batch(span(os.urandom(16), "billing.webhook", attrs=KEYS)))
    other: dict[str, Any] = {**KEYS, "subscription.id": "s2"}
    assert engine.observe(batch(job(attrs=other))) == []


def test_correlate_values_are_typed(engine: Engine) -> None:
    engine.observe(batch(span(os.urandom(16), "billing.webhook", attrs={"tenant.id": "t1",
                                                                    "subscription.id": "1"})))
    typed: dict[str, Any] = {"tenant.id": "t1", "subscription.id": 1}
    assert engine.observe(batch(job(attrs=typed))) == []


def test_an_outcome_can_carry_the_values_on_its_resource(engine: Engine) -> None:
    engine.observe(batch(span(os.urandom(16), "billing.webhook", attrs=KEYS)))
    events = engine.observe(batch(span(os.urandom(16), "provisioning.job", ok=True),
                                  resource=KEYS))
    assert [type(e) for e in events] == [RunPassed]


def test_a_correlated_outcome_sent_before_the_trigger_counts(
    engine: Engine, clock: ManualClock
) -> None:
    engine.observe(batch(job(attrs=KEYS)))
    clock.advance(timedelta(minutes=9))
    engine.tick()

    events = engine.observe(batch(span(os.urandom(16), "billing.webhook", attrs=KEYS)))
    assert [type(e) for e in events] == [RunOpened, RunPassed]


def test_a_correlated_outcome_older_than_within_is_forgotten(
    engine: Engine, clock: ManualClock
) -> None:
    engine.observe(batch(job(attrs=KEYS)))
    clock.advance(timedelta(minutes=10, seconds=1))
    engine.tick()

    events = engine.observe(batch(span(os.urandom(16), "billing.webhook", attrs=KEYS)))
    assert [type(e) for e in events] == [RunOpened]
    assert engine.correlated_spans == 0


def test_a_trace_linked_to_the_trigger_counts_whole(engine: Engine) -> None:
    trace, trigger_id = os.urandom(16), os.urandom(8)
    engine.observe(batch(span(trace, "billing.webhook", span_id=trigger_id)))
    job_trace = os.urandom(16)
    # The outcome carries no correlate values; a span no rule names links its trace in.
    assert engine.observe(batch(span(job_trace, "provisioning.job", ok=True))) == []

    events = engine.observe(batch(span(job_trace, "queue.consume", links=((trace, trigger_id),))))
    assert [type(e) for e in events] == [RunPassed]


def test_a_link_to_any_span_of_the_triggers_trace_counts(engine: Engine) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "billing.webhook")))
    job_trace = os.urandom(16)
    engine.observe(batch(span(job_trace, "queue.consume", links=((trace, os.urandom(8)),))))

    events = engine.observe(batch(span(job_trace, "provisioning.job", ok=True)))
    assert [type(e) for e in events] == [RunPassed]


def test_a_link_seen_before_the_trigger_counts(engine: Engine) -> None:
    trace = os.urandom(16)
    engine.observe(batch(job(links=((trace, os.urandom(8)),))))

    events = engine.observe(batch(span(trace, "billing.webhook")))
    assert [type(e) for e in events] == [RunOpened, RunPassed]


def test_a_rule_without_correlate_ignores_other_traces(engine: Engine) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "local.request")))
    assert engine.observe(batch(span(os.urandom(16), "local.done",
                                     links=((trace, os.urandom(8)),)))) == []


def test_a_correlated_run_fails_at_its_deadline_under_its_triggers_trace(
    engine: Engine, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "billing.webhook", attrs=KEYS)))
    clock.advance(timedelta(minutes=10, seconds=1))

    (failed,) = engine.tick()
    assert isinstance(failed, RunFailed)
    assert failed.trace_id == trace.hex()
    assert failed.missing == ("provisioning.job",)


def test_a_correlated_outcome_after_the_failure_is_reported_late(
    engine: Engine, clock: ManualClock
) -> None:
    engine.observe(batch(span(os.urandom(16), "billing.webhook", attrs=KEYS)))
    clock.advance(timedelta(minutes=11))
    engine.tick()

    events = engine.observe(batch(job(attrs=KEYS)))
    assert [type(e) for e in events] == [LateOutcome]
