"""The extended rule language: forbid, correlate, count, after, duration, max_duration, schedule
and group_by, each loaded into the compiled model, and each mistake located at file:line:col."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from outcomewatch.model import SpanStatus
from outcomewatch.rules import Bounds, DurationBounds, Rule, Schedule, check_paths, load_rules

HEAD = """\
rules:
  - name: r
    trigger: {span: a}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load_one(tmp_path: Path, text: str) -> Rule:
    (rule,) = load_rules([write(tmp_path, text)]).rules
    return rule


def problems(tmp_path: Path, text: str) -> list[str]:
    """Each problem as ``line:col: message`` (the file name is the same for all)."""
    path = write(tmp_path, text)
    return [str(p).removeprefix(f"{path}:") for p in check_paths([path])]


# --- valid forms load into the compiled model --------------------------------------------------


def test_a_rule_without_the_new_keys_gets_their_empty_defaults(tmp_path: Path) -> None:
    rule = load_one(tmp_path, HEAD + "    expect: [{span: b}]\n")

    assert (rule.forbid, rule.correlate, rule.group_by) == ((), (), ())
    assert (rule.max_duration, rule.schedule) == (None, None)
    (expect,) = rule.expect
    assert (expect.count, expect.after_trigger, expect.duration) == (None, False, None)


def test_forbid_loads_as_a_tuple_of_selectors(tmp_path: Path) -> None:
    rule = load_one(
        tmp_path,
        HEAD + "    expect: [{span: b}]\n    forbid:\n      - {span: email.send, status: error}\n",
    )

    (forbidden,) = rule.forbid
    assert (forbidden.span, forbidden.status) == ("email.send", SpanStatus.ERROR)


def test_correlate_by_one_key_loads_as_a_one_element_tuple(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    correlate: {by: subscription.id}\n    within: 10m\n"

    assert load_one(tmp_path, text).correlate == ("subscription.id",)


def test_correlate_by_a_list_keeps_the_keys_in_order(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    correlate: {by: [tenant.id, order.id]}\n"
    text += "    within: 10m\n"

    assert load_one(tmp_path, text).correlate == ("tenant.id", "order.id")


def test_count_after_and_duration_load_onto_the_expectation(tmp_path: Path) -> None:
    text = HEAD + "    expect:\n      - span: b\n        count: {gte: 1, lte: 1}\n"
    text += "        after: trigger\n        duration: {lt: 2s, gte: 100ms}\n"

    (expect,) = load_one(tmp_path, text).expect

    assert expect.count == Bounds(gte=1, lte=1)
    assert expect.after_trigger is True
    assert expect.duration == DurationBounds(
        lt=timedelta(seconds=2), gte=timedelta(milliseconds=100)
    )


def test_a_count_with_one_bound_leaves_the_other_open(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b, count: {lte: 3}}]\n"

    assert load_one(tmp_path, text).expect[0].count == Bounds(gte=None, lte=3)


def test_duration_is_allowed_on_the_trigger_and_on_forbid(tmp_path: Path) -> None:
    text = "rules:\n  - name: r\n    trigger: {span: a, duration: {gt: 1m}}\n"
    text += "    expect: [{span: b}]\n    forbid: [{span: c, duration: {gte: 30s}}]\n"

    rule = load_one(tmp_path, text)

    assert rule.trigger.duration == DurationBounds(gt=timedelta(minutes=1))
    assert rule.forbid[0].duration == DurationBounds(gte=timedelta(seconds=30))


def test_max_duration_loads_as_a_timedelta(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    max_duration: 5m\n"

    assert load_one(tmp_path, text).max_duration == timedelta(minutes=5)


def test_a_schedule_loads_with_its_cron_tz_and_grace(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n"
    text += '    schedule: {cron: "0 3 * * *", tz: Europe/Helsinki, grace: 30m}\n'

    assert load_one(tmp_path, text).schedule == Schedule(
        cron="0 3 * * *", tz="Europe/Helsinki", grace=timedelta(minutes=30)
    )


def test_a_schedule_defaults_to_utc_and_five_minutes_of_grace(tmp_path: Path) -> None:
    text = HEAD + '    expect: [{span: b}]\n    schedule: {cron: "*/15 * * * *"}\n'

    schedule = load_one(tmp_path, text).schedule

    assert schedule is not None
    assert (schedule.tz, schedule.grace) == ("UTC", timedelta(minutes=5))


def test_group_by_loads_as_a_tuple(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    group_by: [customer.id, region]\n"

    assert load_one(tmp_path, text).group_by == ("customer.id", "region")


# --- invalid forms: a precise problem at line:column ------------------------------------------


def test_correlate_without_within_is_an_error_at_the_correlate_key(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    correlate: {by: subscription.id}\n"

    assert problems(tmp_path, text) == [
        "5:5: rules[0].correlate: a rule with 'correlate' must give 'within' "
        "(how long to wait for outcomes from other traces)"
    ]


def test_correlate_without_within_is_reported_next_to_the_rules_other_problems(
    tmp_path: Path,
) -> None:
    text = HEAD + "    expect: [{span: b, status: fine}]\n    correlate: {by: x}\n"

    assert problems(tmp_path, text) == [
        "4:32: rules[0].expect[0].status: invalid value 'fine' (expected 'unset', 'ok' or 'error')",
        "5:5: rules[0].correlate: a rule with 'correlate' must give 'within' "
        "(how long to wait for outcomes from other traces)",
    ]


def test_a_misspelt_within_next_to_correlate_is_one_problem_not_two(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    correlate: {by: x}\n    widthin: 10m\n"

    (problem,) = problems(tmp_path, text)

    assert problem.startswith("6:5: rules[0]: unknown key 'widthin': did you mean 'within'?")


def test_a_key_listed_twice_in_correlate_by_is_an_error(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    correlate: {by: [a, a]}\n    within: 1m\n"

    assert problems(tmp_path, text) == ["5:17: rules[0].correlate.by: 'a' is listed twice"]


def test_a_count_whose_gte_exceeds_its_lte_is_an_error_at_count(tmp_path: Path) -> None:
    text = HEAD + "    expect:\n      - span: b\n        count: {gte: 2, lte: 1}\n"

    assert problems(tmp_path, text) == [
        "6:9: rules[0].expect[0].count: gte (2) is greater than lte (1): no count fits"
    ]


@pytest.mark.parametrize(
    ("count", "column", "message"),
    [
        ("{gte: -1}", 37, "count.gte: must be 0 or more, got int -1"),
        ("{lte: 1.5}", 37, "count.lte: expected an integer, got float 1.5"),
        ("{gte: true}", 37, "count.gte: expected an integer, got bool true"),
        ("{}", 24, "count: needs at least one bound (expected one of: gte, lte)"),
        ("{gte: null}", 37, "count.gte: a bound needs a value, not null"),
        ("1", 31, "count: expected a mapping, got int 1"),
    ],
)
def test_a_malformed_count_is_an_error_at_the_offending_value(
    tmp_path: Path, count: str, column: int, message: str
) -> None:
    text = HEAD + f"    expect: [{{span: b, count: {count}}}]\n"

    assert problems(tmp_path, text) == [f"4:{column}: rules[0].expect[0].{message}"]


def test_after_accepts_only_trigger(tmp_path: Path) -> None:
    text = HEAD + "    expect:\n      - span: b\n        after: start\n"

    assert problems(tmp_path, text) == [
        "6:16: rules[0].expect[0].after: invalid value 'start' (expected 'trigger')"
    ]


@pytest.mark.parametrize("key", ["count", "after"])
def test_count_and_after_on_a_trigger_are_errors_that_say_where_they_belong(
    tmp_path: Path, key: str
) -> None:
    text = f"rules:\n  - name: r\n    trigger:\n      span: a\n      {key}: x\n"
    text += "    expect: [{span: b}]\n"

    assert problems(tmp_path, text) == [
        f"5:7: rules[0].trigger: unknown key {key!r}: {key!r} is only allowed on an 'expect' item"
    ]


def test_a_bad_duration_bound_is_an_error_at_its_value(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b, duration: {lt: 2 sec}}]\n"

    assert problems(tmp_path, text) == [
        "4:39: rules[0].expect[0].duration.lt: invalid duration '2 sec': "
        "use a number with a unit, like 250ms, 30s, 10m, 1h30m, 7d"
    ]


def test_duration_bounds_that_no_duration_satisfies_are_an_error(tmp_path: Path) -> None:
    text = HEAD + "    expect:\n      - span: b\n        duration: {gt: 5s, lte: 5s}\n"

    assert problems(tmp_path, text) == [
        "6:9: rules[0].expect[0].duration: no duration satisfies these bounds"
    ]


def test_equal_inclusive_duration_bounds_are_allowed(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b, duration: {gte: 5s, lte: 5s}}]\n"

    assert problems(tmp_path, text) == []


def test_an_unknown_duration_bound_suggests_the_closest(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b, duration: {lte: 1s, le: 2s}}]\n"

    assert problems(tmp_path, text) == [
        "4:44: rules[0].expect[0].duration: unknown bound 'le': did you mean 'lte'? "
        "(expected one of: lt, lte, gt, gte)"
    ]


def test_a_bad_max_duration_is_an_error_at_its_value(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    max_duration: 5 minutes\n"

    assert problems(tmp_path, text) == [
        "5:19: rules[0].max_duration: invalid duration '5 minutes': "
        "use a number with a unit, like 250ms, 30s, 10m, 1h30m, 7d"
    ]


@pytest.mark.parametrize(
    ("cron", "reason"),
    [
        ("0 25 * * *", "bad hour"),
        ("61 3 * * *", "bad minute"),
        ("0 3 * * 8", "bad day-of-week"),
        ("@daily", "expected 5 fields (minute hour day-of-month month day-of-week), got 1"),
        ("0 0 3 * * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 6"),
    ],
)
def test_a_bad_cron_expression_is_an_error_at_its_value(
    tmp_path: Path, cron: str, reason: str
) -> None:
    text = HEAD + f'    expect: [{{span: b}}]\n    schedule:\n      cron: "{cron}"\n'

    assert problems(tmp_path, text) == [
        f"6:13: rules[0].schedule.cron: invalid cron expression {cron!r}: {reason}"
    ]


def test_an_unknown_time_zone_suggests_the_closest_one(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n"
    text += '    schedule: {cron: "0 3 * * *", tz: Europe/Helsinky}\n'

    assert problems(tmp_path, text) == [
        "5:39: rules[0].schedule.tz: unknown time zone 'Europe/Helsinky' "
        "(did you mean 'Europe/Helsinki'?)"
    ]


def test_a_time_zone_that_resembles_nothing_asks_for_an_iana_name(tmp_path: Path) -> None:
    text = HEAD + '    expect: [{span: b}]\n    schedule: {cron: "0 3 * * *", tz: "+02:00"}\n'

    assert problems(tmp_path, text) == [
        "5:39: rules[0].schedule.tz: unknown time zone '+02:00' (use an IANA name like UTC)"
    ]


def test_a_schedule_without_cron_is_an_error_at_the_schedule_key(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    schedule: {tz: UTC}\n"

    assert problems(tmp_path, text) == ["5:5: rules[0].schedule: 'cron' is required"]


def test_an_empty_group_by_is_an_error(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    group_by: []\n"

    assert problems(tmp_path, text) == ["5:5: rules[0].group_by: must not be empty"]


def test_an_empty_forbid_list_is_an_error(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    forbid: []\n"

    assert problems(tmp_path, text) == ["5:5: rules[0].forbid: must not be empty"]


# --- did you mean -----------------------------------------------------------------------------


def test_a_misspelt_expect_suggests_expect_and_is_not_also_reported_missing(
    tmp_path: Path,
) -> None:
    text = HEAD + "    expcet: [{span: b}]\n"

    (problem,) = problems(tmp_path, text)

    assert problem.startswith("4:5: rules[0]: unknown key 'expcet': did you mean 'expect'? ")


def test_a_misspelt_selector_key_suggests_the_closest(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b, staus: ok}]\n"

    assert problems(tmp_path, text) == [
        "4:24: rules[0].expect[0]: unknown key 'staus': did you mean 'status'? "
        "(expected one of: span, service, status, where, duration, count, after)"
    ]


def test_a_misspelt_schedule_key_suggests_the_closest(tmp_path: Path) -> None:
    text = HEAD + '    expect: [{span: b}]\n    schedule: {cron: "0 3 * * *", grcae: 1m}\n'

    assert problems(tmp_path, text) == [
        "5:35: rules[0].schedule: unknown key 'grcae': did you mean 'grace'? "
        "(expected one of: cron, tz, grace)"
    ]


def test_a_misspelt_correlate_key_suggests_by(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    within: 1m\n    correlate: {bye: x}\n"

    assert problems(tmp_path, text) == [
        "6:17: rules[0].correlate: unknown key 'bye': did you mean 'by'? (expected one of: by)"
    ]


def test_an_unquoted_cron_starting_with_a_star_is_a_yaml_error_with_a_quoting_hint(
    tmp_path: Path,
) -> None:
    text = HEAD + "    expect: [{span: b}]\n    schedule:\n      cron: */15 * * * *\n"

    (problem,) = problems(tmp_path, text)

    assert problem.startswith("6:14: invalid YAML: while scanning an alias")
    assert problem.endswith("""(quote a value that starts with '*', like "*/15 * * * *")""")


def test_correlate_by_that_is_neither_a_key_nor_a_list_is_an_error_saying_so(
    tmp_path: Path,
) -> None:
    text = HEAD + "    expect: [{span: b}]\n    within: 1m\n    correlate: {by: 5}\n"

    assert problems(tmp_path, text) == [
        "6:21: rules[0].correlate.by: expected an attribute key or a list of them, got int 5"
    ]


def test_group_by_accepts_a_single_key_as_a_one_element_list(tmp_path: Path) -> None:
    text = HEAD + "    expect: [{span: b}]\n    group_by: customer.id\n"

    assert load_one(tmp_path, text).group_by == ("customer.id",)
