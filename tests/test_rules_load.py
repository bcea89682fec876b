"""Loading rule files: what is accepted, and every problem located as
``file:line:column: field: message``."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from outcomewatch.errors import Problem, RuleError
from outcomewatch.model import Severity, SpanStatus
from outcomewatch.rules import check_paths, load_rules, rule_files

VALID = """\
rules:
  - name: {name}
    trigger: {{span: a}}
    expect: [{{span: b}}]
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(directory: Path, text: str) -> list[str]:
    return [str(p) for p in check_paths([write(directory, "rules.yaml", text)])]


def test_it_reports_an_operator_typo_a_missing_expect_and_a_duplicate_name_and_nothing_else(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        "bad.yaml",
        """\
        # three mistakes, one per rule
        rules:
          - name: first
            trigger:
              span: stripe.webhook
            expect:
              - span: entitlement.updated
              - span: email.delivered
                where:
                  email.template: {inn: [payment_failed]}
          - name: second
            trigger: {span: a}
          - name: first
            trigger: {span: a}
            expect: [{span: b}]
        """,
    )

    problems = check_paths([path])

    assert problems == [
        Problem(
            str(path),
            10,
            "rules[0].expect[1].where.email.template: unknown operator 'inn': did you mean 'in'? "
            "(expected one of: in, not_in, regex, exists, ne, gt, gte, lt, lte)",
            column=28,
        ),
        Problem(str(path), 11, "rules[1]: 'expect' is required", column=5),
        Problem(
            str(path),
            13,
            f"rules[2]: duplicate rule name 'first' (first defined at {path}:3)",
            column=5,
        ),
    ]


def test_load_rules_raises_a_rule_error_that_lists_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "rules:\n  - name: a\n  - name: b\n")

    with pytest.raises(RuleError) as caught:
        load_rules([path])

    assert [p.line for p in caught.value.problems] == [2, 2, 3, 3]
    assert str(caught.value).splitlines()[0] == f"{path}:2:5: rules[0]: 'trigger' is required"


def test_it_detects_a_duplicate_rule_name_across_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", VALID.format(name="same"))
    second = write(tmp_path, "b.yaml", "# leading comment\n" + VALID.format(name="same"))

    assert [str(p) for p in check_paths([first, second])] == [
        f"{second}:3:5: rules[0]: duplicate rule name 'same' (first defined at {first}:2)"
    ]


def test_it_loads_a_valid_file_with_defaults_source_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "# comment\n" + VALID.format(name="only"))

    rule = load_rules([path]).rules[0]

    assert (rule.name, rule.source, rule.line) == ("only", str(path), 3)
    assert (rule.description, rule.owner, rule.route) == ("", "", "")
    assert rule.severity is Severity.WARNING
    assert rule.within is None
    assert rule.evidence == ()
    assert [s.span for s in rule.expect] == ["b"]


def test_it_loads_every_field_of_a_full_rule(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.yaml",
        """\
        rules:
          - name: full.rule_1
            description: d
            owner: billing
            route: billing-oncall
            severity: critical
            trigger: {span: "stripe.*", service: "billing-*", status: ok}
            expect:
              - {span: x, status: error}
            within: 1h30m
            evidence: [a.id, b.id]
        """,
    )

    rule = load_rules([path]).by_name("full.rule_1")

    assert rule is not None
    assert (rule.owner, rule.route, rule.severity) == ("billing", "billing-oncall", "critical")
    assert (rule.trigger.span, rule.trigger.service) == ("stripe.*", "billing-*")
    assert rule.trigger.status is SpanStatus.OK
    assert rule.expect[0].status is SpanStatus.ERROR
    assert rule.within == timedelta(hours=1, minutes=30)
    assert rule.evidence == ("a.id", "b.id")


def test_by_name_returns_none_for_an_unknown_rule(tmp_path: Path) -> None:
    assert load_rules([write(tmp_path, "r.yaml", VALID.format(name="a"))]).by_name("b") is None


def test_check_paths_returns_no_problems_for_a_valid_file(tmp_path: Path) -> None:
    assert check_paths([write(tmp_path, "r.yaml", VALID.format(name="a"))]) == []


def test_an_unknown_key_in_a_rule_is_named_with_the_allowed_keys(tmp_path: Path) -> None:
    text = VALID.format(name="a") + "    trgger: {span: a}\n"

    assert problems_of(tmp_path, text) == [
        f"{tmp_path / 'rules.yaml'}:5:5: rules[0]: unknown key 'trgger': did you mean 'trigger'? "
        "(expected one of: name, description, owner, route, severity, trigger, expect, forbid, "
        "within, max_duration, correlate, group_by, schedule, evidence, open_after, "
        "resolve_after, reopen_within)"
    ]


def test_an_unknown_key_in_a_selector_is_an_error(tmp_path: Path) -> None:
    text = VALID.format(name="a") + "  - name: b\n    trigger: {span: a}\n    expect:\n"
    text += "      - span: b\n        kind: x\n"

    assert problems_of(tmp_path, text) == [
        f"{tmp_path / 'rules.yaml'}:9:9: rules[1].expect[0]: unknown key 'kind' "
        "(expected one of: span, service, status, where, duration, count, after)"
    ]


def test_an_unknown_top_level_key_is_an_error(tmp_path: Path) -> None:
    text = VALID.format(name="a") + "version: 2\n"

    assert problems_of(tmp_path, text) == [
        f"{tmp_path / 'rules.yaml'}:5:1: unknown key 'version' (expected one of: rules)"
    ]


def test_a_bad_duration_is_an_error_on_its_line(tmp_path: Path) -> None:
    text = VALID.format(name="a") + "    within: 10 min\n"

    assert problems_of(tmp_path, text) == [
        f"{tmp_path / 'rules.yaml'}:5:13: rules[0].within: invalid duration '10 min': "
        "use a number with a unit, like 250ms, 30s, 10m, 1h30m, 7d"
    ]


def test_a_bare_number_is_not_a_duration(tmp_path: Path) -> None:
    text = VALID.format(name="a") + "    within: 10\n"

    assert problems_of(tmp_path, text) == [
        f"{tmp_path / 'rules.yaml'}:5:13: rules[0].within: "
        "a bare number is not a duration; write 10s"
    ]


def test_an_invalid_regex_is_an_error(tmp_path: Path) -> None:
    text = "rules:\n  - name: a\n    trigger:\n      span: a\n      where:\n"
    text += "        k: {regex: '('}\n    expect: [{span: b}]\n"

    assert problems_of(tmp_path, text) == [
        f"{tmp_path / 'rules.yaml'}:6:20: rules[0].trigger.where.k.regex: "
        "invalid regex '(': missing ), unterminated subpattern at position 0"
    ]


def test_a_bad_severity_is_an_error_listing_the_allowed_values(tmp_path: Path) -> None:
    text = VALID.format(name="a") + "    severity: urgent\n"

    assert problems_of(tmp_path, text) == [
        f"{tmp_path / 'rules.yaml'}:5:15: rules[0].severity: invalid value 'urgent' "
        "(expected 'info', 'warning' or 'critical')"
    ]


def test_a_bad_status_is_an_error(tmp_path: Path) -> None:
    text = "rules:\n  - name: a\n    trigger: {span: a, status: fine}\n    expect: [{span: b}]\n"

    assert problems_of(tmp_path, text) == [
        f"{tmp_path / 'rules.yaml'}:3:32: rules[0].trigger.status: invalid value 'fine' "
        "(expected 'unset', 'ok' or 'error')"
    ]


@pytest.mark.parametrize("name", ["Payment", "has space", "a/b", "ünï"])
def test_a_rule_name_outside_the_allowed_pattern_is_an_error(tmp_path: Path, name: str) -> None:
    problems = problems_of(tmp_path, VALID.format(name=f'"{name}"'))

    assert problems == [
        f"{tmp_path / 'rules.yaml'}:2:11: rules[0].name: invalid rule name {name!r}: "
        "use only lowercase letters, digits, '.', '_' and '-'"
    ]


def test_an_empty_expect_list_is_an_error(tmp_path: Path) -> None:
    text = "rules:\n  - name: a\n    trigger: {span: a}\n    expect: []\n"

    assert problems_of(tmp_path, text) == [
        f"{tmp_path / 'rules.yaml'}:4:5: rules[0].expect: must not be empty"
    ]


def test_a_where_value_that_is_neither_scalar_nor_operators_is_an_error(tmp_path: Path) -> None:
    text = "rules:\n  - name: a\n    trigger: {span: a, where: {k: [1, 2]}}\n"
    text += "    expect: [{span: b}]\n"

    assert problems_of(tmp_path, text) == [
        f"{tmp_path / 'rules.yaml'}:3:32: rules[0].trigger.where.k: expected a value to test for "
        "equality (string, number or bool) or a mapping of operators, got a list"
    ]


@pytest.mark.parametrize(
    ("condition", "column", "message"),
    [
        ("{}", 32, "k: a condition mapping needs at least one operator"),
        ("{gt: true}", 40, "k.gt: expected a number (int or float, not bool), got bool true"),
        ("{gte: '5'}", 41, "k.gte: expected a number (int or float, not bool), got str '5'"),
        ("{ne: null}", 40, "k.ne: an operator needs a value, not null"),
        ("{in: []}", 36, "k.in: must not be empty"),
        ("{in: [[1]]}", 41, "k.in[0]: expected a string, number or bool, got a list"),
        ("{exists: 1}", 44, "k.exists: expected true or false, got int 1"),
    ],
)
def test_a_malformed_operator_is_an_error_at_the_offending_value(
    tmp_path: Path, condition: str, column: int, message: str
) -> None:
    text = f"rules:\n  - name: a\n    trigger: {{span: a, where: {{k: {condition}}}}}\n"
    text += "    expect: [{span: b}]\n"

    (problem,) = problems_of(tmp_path, text)

    assert problem.startswith(
        f"{tmp_path / 'rules.yaml'}:3:{column}: rules[0].trigger.where.{message}"
    )


def test_a_yaml_syntax_error_is_one_problem_at_the_line_of_the_mistake(tmp_path: Path) -> None:
    text = "rules:\n  - name: a\n    trigger: [span: a\n    expect: x\n"

    (problem,) = problems_of(tmp_path, text)

    assert problem.startswith(f"{tmp_path / 'rules.yaml'}:4:11: invalid YAML: ")


def test_a_repeated_yaml_key_is_an_error_instead_of_last_one_wins(tmp_path: Path) -> None:
    text = VALID.format(name="a") + "    trigger: {span: c}\n"

    assert problems_of(tmp_path, text) == [
        f"{tmp_path / 'rules.yaml'}:5:5: rules[0]: duplicate key 'trigger' (first at line 3)"
    ]


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text\n", "# only a comment\n"])
def test_a_file_that_is_not_a_mapping_is_a_problem_at_line_one(tmp_path: Path, text: str) -> None:
    assert problems_of(tmp_path, text) == [
        f"{tmp_path / 'rules.yaml'}:1:1: expected a mapping with a 'rules' list"
    ]


def test_rules_that_is_not_a_list_is_an_error(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "\nrules: {name: a}\n") == [
        f"{tmp_path / 'rules.yaml'}:2:1: rules: expected a list, got a mapping"
    ]


def test_a_directory_stands_for_every_yaml_and_yml_file_below_it_sorted(tmp_path: Path) -> None:
    write(tmp_path, "b.yaml", VALID.format(name="b"))
    write(tmp_path, "a.yml", VALID.format(name="a"))
    write(tmp_path, "nested/deeper/c.yaml", VALID.format(name="c"))
    write(tmp_path, "README.md", "not rules")
    write(tmp_path, "notes.txt", "not rules")

    assert rule_files([tmp_path]) == [
        tmp_path / "a.yml",
        tmp_path / "b.yaml",
        tmp_path / "nested/deeper/c.yaml",
    ]
    assert [r.name for r in load_rules([tmp_path]).rules] == ["a", "b", "c"]


def test_a_file_is_taken_as_is_whatever_its_suffix(tmp_path: Path) -> None:
    path = write(tmp_path, "rules.conf", VALID.format(name="a"))

    assert rule_files([path]) == [path]


def test_a_file_named_twice_is_loaded_once(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", VALID.format(name="a"))

    assert len(load_rules([path, tmp_path]).rules) == 1


def test_a_missing_path_is_a_rule_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    with pytest.raises(RuleError) as caught:
        rule_files([missing])

    assert caught.value.problems == [Problem(str(missing), 1, "no such file or directory")]


def test_a_directory_without_rule_files_is_a_problem(tmp_path: Path) -> None:
    assert check_paths([tmp_path]) == [
        Problem(str(tmp_path), 1, "no rule files (*.yaml, *.yml) in directory")
    ]


def test_problems_of_several_files_come_in_file_order_then_line_order(tmp_path: Path) -> None:
    second = write(tmp_path, "2.yaml", "rules:\n  - name: b\n    trigger: {span: a}\n")
    first = write(tmp_path, "1.yaml", "rules:\n  - name: a\n    bogus: 1\n    expect: []\n")

    problems = check_paths([first, second])

    assert [(p.file, p.line) for p in problems] == [
        (str(first), 2),
        (str(first), 3),
        (str(first), 4),
        (str(second), 2),
    ]
