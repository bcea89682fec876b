"""``outcomewatch test`` is strict like promtool: every problem of a test file at once, as
``file:line:col: message``, and an expectation that could never match (a rule no rule file
defines, a status or reason that does not exist) is an error, not a diff. Run through the real
command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "rules" / "examples"

MANY_PROBLEMS = f"""\
rule_files: [{EXAMPLES}/01-payment-failed-access.yaml]
trace_idel: 10s
tests:
  - name: typo in a rule name
    spans: [{{name: stripe.webhook}}]
    expect_runs:
      - {{rule: payment-failed-update-access, status: failed}}
      - {{rule: payment-failed-updates-access, status: failled, reason: idle}}
    expect_incidents:
      - {{rule: nope, status: closed, failure_count: -1}}
  - name: second case
    advance: 600
    spans: [{{name: a, duraton: 1s}}]
    expect_runs: [{{rule: payment-failed-updates-access}}]
  - spans: []
"""


def outcomewatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "outcomewatch", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_every_problem_of_a_test_file_is_reported_at_once_with_its_place(tmp_path: Path) -> None:
    path = tmp_path / "many.test.yaml"
    path.write_text(MANY_PROBLEMS)

    done = outcomewatch("test", str(path))

    assert done.returncode == 1
    rule = "payment-failed-updates-access"
    assert done.stdout.splitlines() == [
        f"FAIL {path}: (file)",
        f"{path}:2:1: test file: unknown key 'trace_idel': did you mean 'trace_idle'? "
        "(allowed: rule_files, trace_idle, start_at, tests)",
        f"{path}:7:16: tests[0].expect_runs[0].rule: no rule file defines a rule "
        f"'payment-failed-update-access': did you mean '{rule}'?",
        f"{path}:8:55: tests[0].expect_runs[1].status: run status 'failled' does not exist: "
        "did you mean 'failed'? (expected one of: open, passed, failed)",
        f"{path}:8:72: tests[0].expect_runs[1].reason: reason 'idle' does not exist "
        "(expected one of: trace_idle, deadline, forbidden, count, max_duration, missed, "
        "evicted)",
        f"{path}:10:16: tests[0].expect_incidents[0].rule: no rule file defines a rule 'nope'",
        f"{path}:10:30: tests[0].expect_incidents[0].status: incident status 'closed' does not "
        "exist (expected one of: open, acknowledged, resolved)",
        f"{path}:10:53: tests[0].expect_incidents[0].failure_count: expected an integer >= 0, "
        "got -1",
        f"{path}:12:14: tests[1].advance: a bare number is not a duration; write 600s or 10m",
        f"{path}:13:23: tests[1].spans[0]: unknown key 'duraton': did you mean 'duration'? "
        "(allowed: name, service, resource, attributes, start, duration, delay, status, "
        "status_message, kind, trace, children)",
        f"{path}:14:19: tests[1].expect_runs[0]: 'status' is required",
        f"{path}:15:5: tests[2]: 'name' is required",
        f"{path}:15:5: tests[2]: give expect_runs or expect_incidents (or both)",
        "0 passed, 1 failed",
    ]


def test_a_valid_file_still_runs_its_cases(tmp_path: Path) -> None:
    done = outcomewatch("test", str(EXAMPLES / "01-payment-failed-access.test.yaml"))
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines()[-1].endswith(" passed, 0 failed")


def test_a_yaml_syntax_error_is_located(tmp_path: Path) -> None:
    path = tmp_path / "broken.test.yaml"
    path.write_text("rule_files: [a.yaml]\ntests:\n  - name: [unclosed\n")

    done = outcomewatch("test", str(path))

    assert done.returncode == 1
    [line] = [x for x in done.stdout.splitlines() if x.startswith(str(path))]
    assert line.startswith(f"{path}:4:1: invalid YAML: ")
