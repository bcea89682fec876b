"""Read queries only the console pages need: the header's counts and the rules page's chart.
Everything a page shows that the JSON API also shows is read through Reader's own methods, so a
page and the API never disagree."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from outcomewatch.store.queries import Reader
from outcomewatch.store.rows import utc

CHART_HOURS = 24


@dataclass(frozen=True, slots=True)
class Counts:
    open_incidents: int  # open or acknowledged
    at_risk_runs: int  # open runs with at least one at-risk span
    judged_last_hour: int  # runs passed or failed in the hour before ``now``


@dataclass(frozen=True, slots=True)
class HourBucket:
    start: datetime
    passed: int
    failed: int


def counts(reader: Reader, *, now: datetime) -> Counts:
    """The console header's counts, in one snapshot."""
    since_us = int((now - timedelta(hours=1)).timestamp() * 1_000_000)
    incidents, at_risk, judged = reader.fetch(
        ("SELECT count(*) FROM incidents WHERE status IN ('open', 'acknowledged')", []),
        ("SELECT count(*) FROM runs WHERE status = 'open' AND coalesce(json_array_length("
         "at_risk), 0) > 0", []),
        ("SELECT count(*) FROM runs WHERE status <> 'open' AND closed_at >= "
         "make_timestamptz(?)", [since_us]),
    )
    return Counts(int(incidents[0][0]), int(at_risk[0][0]), int(judged[0][0]))


def hourly_verdicts(reader: Reader, *, now: datetime) -> Mapping[str, tuple[HourBucket, ...]]:
    """Per rule, passes and failures per hour over the CHART_HOURS hours up to ``now``, oldest
    first; every hour is present (zero when nothing was judged)."""
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    start = end - timedelta(hours=CHART_HOURS)
    start_us = int(start.timestamp() * 1_000_000)
    [rows] = reader.fetch((
        # Whole UTC hours by integer arithmetic: date_trunc would use the session's time zone.
        "SELECT rule, epoch_us(closed_at) // 3600000000 * 3600000000 AS hour, count(*) FILTER "
        "(status = 'passed'), count(*) FILTER (status = 'failed') FROM runs WHERE status <> "
        "'open' AND closed_at >= make_timestamptz(?) GROUP BY rule, hour", [start_us]))
    found: dict[str, dict[datetime, tuple[int, int]]] = {}
    for rule, hour_us, passed, failed in rows:
        found.setdefault(str(rule), {})[utc(int(hour_us))] = (int(passed), int(failed))
    hours = [start + timedelta(hours=i) for i in range(CHART_HOURS)]
    return {
        rule: tuple(HourBucket(h, *by_hour.get(h, (0, 0))) for h in hours)
        for rule, by_hour in found.items()
    }
