"""schedule: a slot without a trigger start near it is reported missed, once."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from outcomewatch.analyzer.engine import Engine, run_id_for
from outcomewatch.clock import ManualClock, to_ns
from outcomewatch.model import FailureReason, RunFailed, RunOpened
from tests.test_engine import batch, make_engine, span

RULES = """
rules:
  - name: nightly-backup
    trigger: {span: backup.run, where: {backup.kind: nightly}}
    expect: [{span: backup.verify, status: ok}]
    schedule: {cron: "0 3 * * *", tz: Europe/Helsinki, grace: 30m}
    within: 2h
    group_by: [host.name]
"""
# 03:00 in Helsinki is 00:00 UTC in summer time (EEST, UTC+3), 01:00 UTC in winter (EET, UTC+2).
SLOT = datetime(2026, 10, 20, 0, 0, tzinfo=UTC)
GRACE = timedelta(minutes=30)
HOUR = timedelta(hours=1)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(SLOT - timedelta(hours=12))


@pytest.fixture
def engine(tmp_path: Path, clock: ManualClock) -> Engine:
    return make_engine(tmp_path, RULES, clock)


def trigger(at: datetime) -> Span:
    """The trigger span of a nightly backup, started at ``at``."""
    return span(os.urandom(16), "backup.run", start_ns=to_ns(at), attrs={"backup.kind": "nightly"})


def missed(engine: Engine, clock: ManualClock, until: datetime) -> list[RunFailed]:
    """Tick every 10 minutes up to ``until``; the missed slots reported on the way."""
    found: list[RunFailed] = []
    while clock() < until:
        clock.advance(min(timedelta(minutes=10), until - clock()))
        found.extend(e for e in engine.tick()
                     if isinstance(e, RunFailed) and e.reason is FailureReason.MISSED)
    return found


def test_a_slot_without_a_trigger_is_missed_once_its_grace_has_passed(
    engine: Engine, clock: ManualClock
) -> None:
    assert missed(engine, clock, SLOT + GRACE) == []
    clock.advance(timedelta(seconds=1))

    (failed,) = engine.tick()
    assert failed == RunFailed(
        run_id=run_id_for("nightly-backup", "schedule", SLOT.isoformat()),
        rule="nightly-backup", trace_id="", trigger=None, opened_at=SLOT, closed_at=clock(),
        reason=FailureReason.MISSED, missing=("backup.run",), first_received_ns=0,
        group=(("host.name", None),),
    )
    assert engine.tick() == []


def test_a_trigger_that_starts_within_the_grace_keeps_the_slot(
    engine: Engine, clock: ManualClock
) -> None:
    clock.advance(SLOT + GRACE - clock())
    events = engine.observe(batch(trigger(SLOT + GRACE - timedelta(seconds=1))))
    assert [type(e) for e in events] == [RunOpened]

    assert missed(engine, clock, SLOT + 2 * HOUR) == []


def test_a_trigger_that_starts_shortly_before_the_slot_keeps_it(
    engine: Engine, clock: ManualClock
) -> None:
    engine.observe(batch(trigger(SLOT - GRACE)))
    assert missed(engine, clock, SLOT + 2 * HOUR) == []


def test_a_trigger_that_starts_after_the_grace_does_not_keep_the_slot(
    engine: Engine, clock: ManualClock
) -> None:
    engine.observe(batch(trigger(SLOT + GRACE + timedelta(seconds=1))))
    assert [f.opened_at for f in missed(engine, clock, SLOT + 2 * HOUR)] == [SLOT]


def test_a_trigger_that_does_not_match_in_full_does_not_keep_the_slot(
    engine: Engine, clock: ManualClock
) -> None:
    engine.observe(batch(span(os.urandom(16), "backup.run", start_ns=to_ns(SLOT),
                              attrs={"backup.kind": "weekly"})))
    assert len(missed(engine, clock, SLOT + 2 * HOUR)) == 1


def test_one_trigger_keeps_one_slot_only(tmp_path: Path) -> None:
    clock = ManualClock(SLOT - timedelta(seconds=1))
    engine = make_engine(tmp_path, """
rules:
  - name: every-ten-minutes
    trigger: {span: tick.run}
    expect: [{span: tick.done}]
    schedule: {cron: "*/10 * * * *", grace: 10m}
""", clock)
    start = SLOT + timedelta(minutes=5)
    clock.advance(start - clock())
    engine.observe(batch(span(os.urandom(16), "tick.run", start_ns=to_ns(start))))

    reported = missed(engine, clock, SLOT + timedelta(minutes=31))
    # 00:05 is within the grace of both 00:00 and 00:10, but keeps only 00:00.
    assert [f.opened_at for f in reported] == [SLOT + timedelta(minutes=10),
                                               SLOT + timedelta(minutes=20)]


def test_every_slot_is_judged_when_the_clock_jumps_over_several(
    engine: Engine, clock: ManualClock
) -> None:
    clock.advance(timedelta(days=3))
    failed = engine.tick()

    assert [f.opened_at for f in failed if isinstance(f, RunFailed)] == [
        SLOT, SLOT + timedelta(days=1), SLOT + timedelta(days=2)]
    assert len({f.run_id for f in failed if isinstance(f, RunFailed)}) == 3


def test_slots_follow_the_zones_change_from_summer_to_winter_time(
    tmp_path: Path
) -> None:
    clock = ManualClock(datetime(2026, 10, 23, 12, tzinfo=UTC))
    engine = make_engine(tmp_path, RULES, clock)

    reported = missed(engine, clock, datetime(2026, 10, 27, 12, tzinfo=UTC))
    assert [f.opened_at for f in reported] == [
        datetime(2026, 10, 24, 0, tzinfo=UTC),  # 03:00 EEST
        datetime(2026, 10, 25, 0, tzinfo=UTC),  # 03:00 EEST, the first of the two 03:00s
        datetime(2026, 10, 26, 1, tzinfo=UTC),  # 03:00 EET
        datetime(2026, 10, 27, 1, tzinfo=UTC),
    ]


def test_slots_before_the_engine_started_are_not_judged(tmp_path: Path) -> None:
    clock = ManualClock(SLOT + timedelta(minutes=1))
    engine = make_engine(tmp_path, RULES, clock)

    assert [f.opened_at for f in missed(engine, clock, SLOT + timedelta(days=1, hours=1))] == [
        SLOT + timedelta(days=1)]


def test_progress_tells_the_last_slot_judged(engine: Engine, clock: ManualClock) -> None:
    missed(engine, clock, SLOT + HOUR)
    assert engine.schedule_progress() == {"nightly-backup": SLOT}


def test_a_restart_from_the_saved_progress_neither_repeats_nor_skips_a_slot(
    tmp_path: Path, engine: Engine, clock: ManualClock
) -> None:
    assert len(missed(engine, clock, SLOT + HOUR)) == 1
    saved = engine.schedule_progress()
    clock.advance(timedelta(days=2))  # down for two days

    restarted = make_engine(tmp_path, RULES, clock, schedule_since=saved)
    assert [f.opened_at for f in restarted.tick() if isinstance(f, RunFailed)] == [
        SLOT + timedelta(days=1), SLOT + timedelta(days=2)]
    assert restarted.schedule_progress() == {"nightly-backup": SLOT + timedelta(days=2)}
