"""The compiled timing and counting parts of a rule: Bounds, DurationBounds (and the selector's
duration check) and Schedule's cron slots, across daylight-saving changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from outcomewatch.model import Span, SpanStatus
from outcomewatch.rules import Bounds, DurationBounds, Schedule, Selector

SECOND = 1_000_000_000


def span_lasting(ns: int) -> Span:
    return Span(
        trace_id="0" * 32,
        span_id="1" * 16,
        parent_span_id="",
        name="work",
        service="api",
        kind=1,
        start_ns=1_700_000_000 * SECOND,
        end_ns=1_700_000_000 * SECOND + ns,
        status=SpanStatus.OK,
        status_message="",
    )


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# --- Bounds ------------------------------------------------------------------------------------


def test_bounds_with_gte_and_lte_admit_only_counts_between_them_inclusive() -> None:
    exactly_once = Bounds(gte=1, lte=1)

    assert [exactly_once.admits(n) for n in (0, 1, 2)] == [False, True, False]


def test_bounds_without_lte_admit_any_count_from_gte_up() -> None:
    assert [Bounds(gte=2).admits(n) for n in (1, 2, 100)] == [False, True, True]


def test_bounds_without_gte_admit_zero() -> None:
    assert [Bounds(lte=1).admits(n) for n in (0, 1, 2)] == [True, True, False]


# --- DurationBounds ----------------------------------------------------------------------------


def test_duration_bounds_lt_and_gt_are_strict() -> None:
    bounds = DurationBounds(gt=timedelta(seconds=1), lt=timedelta(seconds=2))

    assert not bounds.admits(timedelta(seconds=1))
    assert bounds.admits(timedelta(milliseconds=1500))
    assert not bounds.admits(timedelta(seconds=2))


def test_duration_bounds_lte_and_gte_are_inclusive() -> None:
    bounds = DurationBounds(gte=timedelta(seconds=1), lte=timedelta(seconds=2))

    assert bounds.admits(timedelta(seconds=1))
    assert bounds.admits(timedelta(seconds=2))
    assert not bounds.admits(timedelta(seconds=2, microseconds=1))


def test_duration_bounds_compare_nanoseconds_exactly() -> None:
    bounds = DurationBounds(gt=timedelta(seconds=2))

    assert not bounds.admits_ns(2 * SECOND)
    assert bounds.admits_ns(2 * SECOND + 1)


def test_a_selector_with_a_duration_matches_only_spans_whose_end_minus_start_fits() -> None:
    selector = Selector(span="work", duration=DurationBounds(lt=timedelta(seconds=2)))

    assert selector.matches(span_lasting(2 * SECOND - 1))
    assert not selector.matches(span_lasting(2 * SECOND))


def test_a_selector_ignores_count_and_after_trigger_when_matching_one_span() -> None:
    selector = Selector(span="work", count=Bounds(gte=2, lte=2), after_trigger=True)

    assert selector.matches(span_lasting(SECOND))


# --- Schedule.slots_between --------------------------------------------------------------------


def helsinki_at_three() -> Schedule:
    return Schedule(cron="0 3 * * *", tz="Europe/Helsinki", grace=timedelta(minutes=30))


def test_a_daily_local_job_is_at_the_same_local_time_on_both_sides_of_spring_forward() -> None:
    # 2026-03-29: Helsinki goes from 03:00 EET (UTC+2) straight to 04:00 EEST (UTC+3).
    slots = helsinki_at_three().slots_between(utc(2026, 3, 27, 12), utc(2026, 3, 31, 12))

    assert slots == [
        utc(2026, 3, 28, 1),  # 03:00 EET
        utc(2026, 3, 29, 1),  # 03:00 does not exist: once, at the jump (04:00 EEST)
        utc(2026, 3, 30, 0),  # 03:00 EEST
        utc(2026, 3, 31, 0),
    ]


def test_a_daily_local_job_runs_once_when_fall_back_repeats_its_hour() -> None:
    # 2026-10-25: Helsinki goes from 04:00 EEST back to 03:00 EET; 03:00 happens twice.
    slots = helsinki_at_three().slots_between(utc(2026, 10, 23, 12), utc(2026, 10, 27, 12))

    assert slots == [
        utc(2026, 10, 24, 0),  # 03:00 EEST
        utc(2026, 10, 25, 0),  # the first 03:00 only
        utc(2026, 10, 26, 1),  # 03:00 EET
        utc(2026, 10, 27, 1),
    ]


def test_an_hourly_job_runs_every_real_hour_through_fall_back() -> None:
    schedule = Schedule(cron="30 * * * *", tz="Europe/Helsinki", grace=timedelta(minutes=5))

    slots = schedule.slots_between(utc(2026, 10, 24, 23), utc(2026, 10, 25, 3))

    assert slots == [utc(2026, 10, 24, 23, 30), *(utc(2026, 10, 25, h, 30) for h in range(3))]


def test_slots_are_in_the_half_open_window_start_excluded_end_included() -> None:
    slots = helsinki_at_three().slots_between(utc(2026, 3, 30, 0), utc(2026, 3, 31, 0))

    assert slots == [utc(2026, 3, 31, 0)]


def test_a_window_starting_in_the_repeated_hour_misses_no_slot_and_repeats_none() -> None:
    # 01:10 UTC is 03:10 EET, the second 03:10 of the day: the 03:00 slot (00:00 UTC) is past.
    slots = helsinki_at_three().slots_between(utc(2026, 10, 25, 1, 10), utc(2026, 10, 26, 2))

    assert slots == [utc(2026, 10, 26, 1)]


def test_slots_are_aware_utc_datetimes_whatever_the_zone_of_the_window() -> None:
    helsinki_summer = timezone(timedelta(hours=3))

    (slot,) = helsinki_at_three().slots_between(
        datetime(2026, 6, 1, 12, tzinfo=helsinki_summer),
        datetime(2026, 6, 2, 12, tzinfo=helsinki_summer),
    )

    assert (slot, slot.tzinfo) == (utc(2026, 6, 2, 0), UTC)


def test_an_empty_window_has_no_slots() -> None:
    moment = utc(2026, 1, 1)

    assert helsinki_at_three().slots_between(moment, moment) == []


def test_slots_between_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        helsinki_at_three().slots_between(datetime(2026, 1, 1), utc(2026, 1, 2))
