"""load_rules: new spans follow the new rules; open runs finish under the rule they opened with."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from outcomewatch.analyzer.engine import Engine
from outcomewatch.clock import ManualClock
from outcomewatch.model import RunFailed, RunOpened, RunPassed
from outcomewatch.rules import RuleSet, load_rules
from tests.test_engine import IDLE, batch, make_engine, span

RULES = """
rules:
  - name: order-confirmed
    trigger: {span: order.placed}
    expect: [{span: email.sent}]
  - name: export-ready
    trigger: {span: export.requested}
    expect: [{span: export.uploaded}]
    schedule: {cron: "0 3 * * *"}
"""


def rules(tmp_path: Path, text: str) -> RuleSet:
    path = tmp_path / "reloaded.yaml"
    path.write_text(text)
    return load_rules([path])


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 3, 1, 12, tzinfo=UTC))


@pytest.fixture
def engine(tmp_path: Path, clock: ManualClock) -> Engine:
    return make_engine(tmp_path, RULES, clock)


def test_an_unchanged_rule_keeps_its_open_runs(engine: Engine, tmp_path: Path) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "order.placed")))
    engine.load_rules(rules(tmp_path, "# moved down a line\n" + RULES))

    assert [type(e) for e in engine.observe(batch(span(trace, "email.sent")))] == [RunPassed]


def test_a_run_opened_under_a_changed_rule_is_decided_by_the_old_definition(
    engine: Engine, tmp_path: Path
) -> None:
    old, new = os.urandom(16), os.urandom(16)
    engine.observe(batch(span(old, "order.placed")))
    engine.load_rules(rules(tmp_path, RULES.replace("email.sent", "sms.sent")))
    engine.observe(batch(span(new, "order.placed")))

    events = engine.observe(batch(span(old, "email.sent"), span(new, "email.sent"),
                                  span(new, "sms.sent")))
    assert [e.trace_id for e in events if isinstance(e, RunPassed)] == [old.hex(), new.hex()]


def test_a_run_of_a_removed_rule_still_gets_its_verdict(
    engine: Engine, tmp_path: Path, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "order.placed")))
    engine.load_rules(rules(tmp_path, "rules:\n  - name: export-ready" +
                            RULES.split("  - name: export-ready")[1]))
    assert engine.observe(batch(span(os.urandom(16), "order.placed"))) == []
    clock.advance(IDLE)

    (failed,) = engine.tick()
    assert isinstance(failed, RunFailed)
    assert (failed.trace_id, failed.rule, failed.missing) == (
        trace.hex(), "order-confirmed", ("email.sent",))


def test_a_new_rule_opens_runs_for_triggers_after_the_reload(
    engine: Engine, tmp_path: Path
) -> None:
    engine.load_rules(rules(tmp_path, RULES + """
  - name: refund-issued
    trigger: {span: refund.requested}
    expect: [{span: refund.sent}]
"""))
    assert [type(e) for e in engine.observe(batch(span(os.urandom(16), "refund.requested")))] == [
        RunOpened]


def test_an_unchanged_schedule_keeps_its_progress_across_a_reload(
    engine: Engine, tmp_path: Path, clock: ManualClock
) -> None:
    clock.advance(timedelta(days=1))
    assert len(engine.tick()) == 1
    progress = engine.schedule_progress()
    engine.load_rules(rules(tmp_path, RULES))

    assert engine.tick() == []
    assert engine.schedule_progress() == progress


def test_a_changed_schedule_is_judged_from_the_reload_on(
    engine: Engine, tmp_path: Path, clock: ManualClock
) -> None:
    clock.advance(timedelta(hours=12))
    engine.load_rules(rules(tmp_path, RULES.replace("0 3 * * *", "0 1 * * *")))

    assert engine.schedule_progress() == {"export-ready": clock()}
    clock.advance(timedelta(days=1))
    assert [e.opened_at for e in engine.tick() if isinstance(e, RunFailed)] == [
        datetime(2026, 3, 2, 1, tzinfo=UTC)]
