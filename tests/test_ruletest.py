"""``outcomewatch test``: rule unit tests run through the real streaming engine.

The shipped test files (rules/examples/*.test.yaml) must cover every example rule and pass; a wrong
expectation must fail with a readable diff (expected vs actual, as YAML)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

from outcomewatch import cli
from outcomewatch.offline.spans import TreeBuilder
from outcomewatch.rules import load_rules

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "rules" / "examples"
TEST_FILES = sorted((ROOT / "rules" / "examples").glob("*.test.yaml"))


def run(capsys: pytest.CaptureFixture[str], *files: Path) -> tuple[int, str]:
    code = cli.main(["test", *map(str, files)])
    return code, capsys.readouterr().out


def write(tmp_path: Path, text: str, name: str = "case.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("EXAMPLES", str(EXAMPLES)))
    return path


def test_every_example_rule_has_a_test_file_with_a_healthy_and_a_broken_case() -> None:
    tested: dict[str, set[str]] = {}
    for path in TEST_FILES:
        document = yaml.safe_load(path.read_text())
        for rule in load_rules([path.parent / f for f in document["rule_files"]]):
            statuses = {run["status"] for case in document["tests"]
                        for run in case.get("expect_runs") or [] if run["rule"] == rule.name}
            tested.setdefault(rule.name, set()).update(statuses)
    example_rules = {rule.name for rule in load_rules([EXAMPLES])}
    assert set(tested) == example_rules
    assert all({"passed", "failed"} <= statuses for statuses in tested.values()), tested


def test_the_shipped_rule_tests_pass(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, *TEST_FILES)
    last = out.strip().splitlines()[-1]
    assert code == 0, out
    assert last.endswith(" passed, 0 failed")
    assert int(last.split()[0]) >= 2 * len(TEST_FILES)


WRONG = """
rule_files: [EXAMPLES/01-payment-failed-access.yaml]
tests:
  - name: the email never comes, but the test says it passes
    spans:
      - name: stripe.webhook
        attributes: {event.type: invoice.payment_failed}
        status: ok
        children:
          - {name: entitlement.updated, status: ok}
    expect_runs:
      - {rule: payment-failed-updates-access, status: passed, missing: []}
    expect_incidents: []
  - name: this one is right
    spans:
      - {name: stripe.webhook, attributes: {event.type: invoice.paid}}
    expect_runs: []
"""


def test_a_wrong_expectation_fails_with_a_diff_naming_file_and_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, WRONG)
    code, out = run(capsys, path)

    assert code == 1
    assert f"FAIL {path}: the email never comes, but the test says it passes" in out
    assert f"PASS {path}: this one is right" in out
    diff = [line.strip() for line in out.splitlines()]
    assert "--- expected" in diff and "+++ actual" in diff
    assert "-- {rule: payment-failed-updates-access, status: passed, missing: []}" in diff
    assert ("+- {rule: payment-failed-updates-access, status: failed, missing: "
            "[email.delivered], reason: deadline}") in diff
    assert "-incidents: []" in diff
    assert "+- {rule: payment-failed-updates-access, failure_count: 1, status: open}" in diff
    assert out.strip().splitlines()[-1] == "1 passed, 1 failed"


def test_an_unexpected_run_fails_the_case(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, """
rule_files: [EXAMPLES/10-grouped-by-customer.yaml]
tests:
  - name: two requests, one expected
    spans:
      - {name: export.request, trace: a, attributes: {customer.id: c1}}
      - {name: export.request, trace: b, attributes: {customer.id: c1}}
    expect_runs:
      - {rule: customer-export-delivered, status: failed, trace: a}
""")
    code, out = run(capsys, path)
    assert code == 1
    assert ("+- {rule: customer-export-delivered, status: failed, missing: [export.delivered], "
            "reason: deadline, trace: b}") in out


def test_expectations_compare_only_the_keys_they_give(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, """
rule_files: [EXAMPLES/03-model-batch-visible.yaml]
tests:
  - name: only the status matters here; missing is compared as a set
    spans:
      - {name: batch.process, attributes: {batch.size: 3}, status: ok}
    expect_runs:
      - rule: model-batch-results-visible
        status: failed
        missing: [result.published, result.validated, result.persisted]
    expect_incidents:
      - {rule: model-batch-results-visible}
""")
    code, out = run(capsys, path)
    assert code == 0, out


def test_advance_bounds_how_long_time_runs(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, """
rule_files: [EXAMPLES/05-backup-restore-proven.yaml]
tests:
  - name: an hour in, the 2h deadline has not passed
    spans:
      - {name: backup.run, status: ok}
    advance: 1h
    expect_runs:
      - {rule: backup-restore-proven, status: open}
""")
    code, out = run(capsys, path)
    assert code == 0, out


def test_open_after_holds_the_incident_back_until_enough_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "rules.yaml").write_text("""
rules:
  - name: flaky
    trigger: {span: job}
    expect: [{span: job.done}]
    open_after: 3
""")
    spans = "\n".join(f"      - {{name: job, trace: t{i}, start: {i}s}}" for i in range(4))
    path = write(tmp_path, f"""
rule_files: [rules.yaml]
trace_idle: 5s
tests:
  - name: two failures open nothing
    spans:
      - {{name: job, trace: a}}
      - {{name: job, trace: b, start: 1s}}
    expect_incidents: []
  - name: the third opens one incident holding all of them; the fourth joins it
    spans:
{spans}
    expect_incidents:
      - {{rule: flaky, failure_count: 4, status: open}}
""")
    code, out = run(capsys, path)
    assert code == 0, out


def test_spans_can_come_from_an_otlp_json_file(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    tree = TreeBuilder("x", "y", 1_790_000_000 * 10**9)
    tree.add([{"name": "report.generate", "status": "ok",
               "attributes": {"report.schedule": "weekly"}},
              {"name": "email.delivered", "status": "ok", "start": "2m"}], "spans")
    lines = []
    for planned in tree.planned:  # as the Collector's file exporter writes: hex ids, camelCase
        document = json_format.MessageToDict(planned.request)
        for resource_spans in document["resourceSpans"]:
            for scope_spans in resource_spans["scopeSpans"]:
                for span in scope_spans["spans"]:
                    for key in ("traceId", "spanId"):
                        span[key] = base64.b64decode(span[key]).hex()
        lines.append(json.dumps(document))
    (tmp_path / "spans.json").write_text("\n".join(lines) + "\n")
    path = write(tmp_path, """
rule_files: [EXAMPLES/02-report-delivered.yaml]
tests:
  - name: from the Collector's file exporter
    otlp_json: spans.json
    expect_runs:
      - {rule: scheduled-report-delivered, status: passed, missing: []}
""")
    code, out = run(capsys, path)
    assert code == 0, out


@pytest.mark.parametrize(("text", "message"), [
    ("rule_files: [EXAMPLES/01-payment-failed-access.yaml]\ntests:\n  - name: x\n"
     "    spans: [{name: a, duraton: 1s}]\n",
     "tests[0].spans[0]: unknown key 'duraton': did you mean 'duration'?"),
    ("rule_files: [EXAMPLES/01-payment-failed-access.yaml]\ntests:\n  - name: x\n"
     "    spans: [{name: a, start: soon}]\n",
     "tests[0].spans[0].start: invalid duration 'soon'"),
    ("rule_files: [nowhere.yaml]\ntests: []\n", "nowhere.yaml:1:1: no such file or directory"),
    ("rule_files: [EXAMPLES/01-payment-failed-access.yaml]\ntests:\n  - name: x\n"
     "    expect_runs: [{rule: r}]\n",
     "tests[0].expect_runs[0]: 'status' is required"),
])
def test_a_malformed_test_file_is_a_failure_that_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    code, out = run(capsys, write(tmp_path, text))
    assert code == 1
    assert message in out
    assert out.strip().splitlines()[-1].endswith("1 failed")


def test_a_case_must_expect_something(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "rule_files: [EXAMPLES/01-payment-failed-access.yaml]\n"
                           "tests:\n  - name: x\n    spans: [{name: a}]\n")
    code, out = run(capsys, path)
    assert code == 1
    assert "give expect_runs or expect_incidents" in out
