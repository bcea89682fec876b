"""`outcomewatch check` and `outcomewatch schema`, run through cli.main as the console script."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from outcomewatch import cli

EXAMPLES = Path(__file__).resolve().parent.parent / "rules" / "examples"

VALID = """\
rules:
  - name: {name}
    trigger: {{span: a}}
    expect: [{{span: b}}]
"""

# The issue's acceptance case: an operator typo, a missing expect and a duplicate rule name.
THREE_MISTAKES = """\
rules:
  - name: first
    trigger: {span: stripe.webhook}
    expect:
      - span: email.delivered
        where:
          email.template: {inn: [dunning]}
  - name: second
    trigger: {span: a}
  - name: first
    trigger: {span: a}
    expect: [{span: b}]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_issues_three_mistakes_are_three_located_lines_and_a_failing_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "bad.yaml", THREE_MISTAKES)

    code = cli.main(["check", str(path)])

    out, err = capsys.readouterr()
    assert code == 1
    assert out.splitlines() == [
        f"{path}:7:28: rules[0].expect[0].where.email.template: unknown operator 'inn': "
        "did you mean 'in'? (expected one of: in, not_in, regex, exists, ne, gt, gte, lt, lte)",
        f"{path}:8:5: rules[1]: 'expect' is required",
        f"{path}:10:5: rules[2]: duplicate rule name 'first' (first defined at {path}:2)",
    ]
    assert err == "3 error(s)\n"


def test_a_clean_check_exits_zero_and_counts_the_rules_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "a.yaml", VALID.format(name="a"))
    write(tmp_path, "b.yaml", VALID.format(name="b"))

    code = cli.main(["check", str(tmp_path)])

    assert code == 0
    assert capsys.readouterr() == ("", "ok: 2 rule(s)\n")


def test_the_json_format_lists_each_problem_with_file_line_column_and_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "bad.yaml", THREE_MISTAKES)

    code = cli.main(["check", "--format", "json", str(path)])

    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [(p["file"], p["line"], p["column"]) for p in report["problems"]] == [
        (str(path), 7, 28),
        (str(path), 8, 5),
        (str(path), 10, 5),
    ]
    assert report["problems"][1]["message"] == "rules[1]: 'expect' is required"
    assert report["rules"] == 0  # a file with errors contributes no rule


def test_the_json_format_of_a_clean_check_has_no_problems_and_the_rule_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "a.yaml", VALID.format(name="a"))

    code = cli.main(["check", str(path), "--format", "json"])

    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"problems": [], "rules": 1}


def test_a_missing_path_is_a_problem_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.yaml"

    code = cli.main(["check", str(missing)])

    assert code == 1
    assert capsys.readouterr().out == f"{missing}:1:1: no such file or directory\n"


def test_duplicate_names_across_files_are_reported_at_the_second_definition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write(tmp_path, "a.yaml", VALID.format(name="same"))
    second = write(tmp_path, "b.yaml", VALID.format(name="same"))

    code = cli.main(["check", str(first), str(second)])

    assert code == 1
    assert capsys.readouterr().out == (
        f"{second}:2:5: rules[0]: duplicate rule name 'same' (first defined at {first}:2)\n"
    )


def test_an_unknown_format_is_a_usage_error(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", VALID.format(name="a"))

    with pytest.raises(SystemExit) as exited:
        cli.main(["check", "--format", "xml", str(path)])

    assert exited.value.code == 2


def test_every_example_file_passes_check(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["check", str(EXAMPLES)])

    out, err = capsys.readouterr()
    assert (code, out) == (0, "")
    rule_files = [p for p in EXAMPLES.glob("*.yaml") if not p.name.endswith(".test.yaml")]
    assert err == f"ok: {len(rule_files)} rule(s)\n"  # one rule per example file


def test_schema_prints_the_json_schema_of_a_rule_file(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["schema"])

    schema = json.loads(capsys.readouterr().out)
    assert code == 0
    assert schema["title"] == "outcomewatch rule file"
    assert "RuleModel" in schema["$defs"]
