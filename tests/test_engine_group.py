"""group_by: the trigger's values of the keys, on every verdict."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from outcomewatch.analyzer.engine import Engine
from outcomewatch.clock import ManualClock
from outcomewatch.model import RunFailed, RunPassed
from tests.test_engine import IDLE, batch, make_engine, span

RULES = """
rules:
  - name: export-delivered
    trigger: {span: export.request}
    expect: [{span: export.delivered}]
    group_by: [customer.id, region, plan]
  - name: ungrouped
    trigger: {span: plain.request}
    expect: [{span: plain.done}]
"""


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def engine(tmp_path: Path, clock: ManualClock) -> Engine:
    return make_engine(tmp_path, RULES, clock)


def test_a_passed_run_carries_the_triggers_group_values(engine: Engine) -> None:
    trace = os.urandom(16)
    events = engine.observe(batch(
        span(trace, "export.request", attrs={"customer.id": "c1", "plan": 3}),
        span(trace, "export.delivered"), resource={"region": "eu"}))

    passed = events[-1]
    assert isinstance(passed, RunPassed)
    assert passed.group == (("customer.id", "c1"), ("region", "eu"), ("plan", 3))


def test_a_failed_run_carries_the_group_values_with_none_for_missing_keys(
    engine: Engine, clock: ManualClock
) -> None:
    engine.observe(batch(span(os.urandom(16), "export.request", attrs={"customer.id": "c2"})))
    clock.advance(IDLE)

    (failed,) = engine.tick()
    assert isinstance(failed, RunFailed)
    assert failed.group == (("customer.id", "c2"), ("region", None), ("plan", None))


def test_a_rule_without_group_by_has_an_empty_group(engine: Engine) -> None:
    trace = os.urandom(16)
    events = engine.observe(batch(span(trace, "plain.request"), span(trace, "plain.done")))
    assert isinstance(events[-1], RunPassed)
    assert events[-1].group == ()
