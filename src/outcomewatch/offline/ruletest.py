"""Rule unit tests, in the spirit of ``promtool test rules``: ``outcomewatch test FILE...``.

A test file names rule files and cases; each case gives input spans (a compact span tree with
times relative to the case's start, or an OTLP/JSON file) and the runs and incidents expected.
A case runs through the real streaming engine (see ``drive``): every span is exported in a
request of its own when it ends, the clock moved to that instant and ticked; then time runs on
for ``advance``. Expected and actual runs are matched item by item on the keys the expectation
gives; a mismatch prints a unified diff of both, rendered as YAML.

    rule_files: [../examples/01-payment-failed-access.yaml]   # relative to this file
    trace_idle: 10s                # optional
    start_at: 2026-01-01T00:00:00Z # optional: when every case starts (absolute, UTC)
    tests:
      - name: ...
        start_at: ...              # optional, per case
        spans: [...]               # or otlp_json: FILE
        advance: 11m               # optional
        expect_runs: [{rule, status, missing, reason, trace}]   # rule and status required
        expect_incidents: [{rule, failure_count, group, status}]  # rule required
"""

from __future__ import annotations

import difflib
import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import yaml

from outcomewatch.offline.drive import (
    BookIncident,
    Driver,
    IncidentBook,
    RunRecord,
    Verdicts,
    at_ns,
    ns_of,
    settle_horizon,
)
from outcomewatch.offline.ruletest_check import check_test_file, parse_start_at
from outcomewatch.offline.spans import (
    Planned,
    SpecError,
    TreeBuilder,
    check_keys,
    earliest_start_ns,
    offset_ns,
    read_otlp_json,
)
from outcomewatch.otlp import batch_from_request
from outcomewatch.rules import RuleSet

DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
DEFAULT_IDLE = timedelta(seconds=10)
GRID = timedelta(seconds=1)
FILE_KEYS = ("rule_files", "trace_idle", "start_at", "tests")
CASE_KEYS = ("name", "start_at", "spans", "otlp_json", "advance", "expect_runs",
             "expect_incidents")
RUN_KEYS = ("rule", "status", "missing", "reason", "trace")
INCIDENT_KEYS = ("rule", "failure_count", "group", "status")

Item = dict[str, Any]


@dataclass(frozen=True, slots=True)
class CaseResult:
    file: str
    name: str
    passed: bool
    report: str = ""  # the diff, or the error, of a case that did not pass
    problems: tuple[str, ...] = ()  # file:line:col: message, for a file that does not parse


# -- the test file ---------------------------------------------------------------------------


def _expectations(value: Any, keys: Sequence[str], required: Sequence[str], where: str
                  ) -> list[Item]:
    if not isinstance(value, list):
        raise SpecError(f"{where}: expected a list")
    items = [dict(check_keys(item, keys, f"{where}[{i}]", required))
             for i, item in enumerate(value)]
    for i, item in enumerate(items):
        status = item.get("status")
        if status is not None and not isinstance(status, str):
            raise SpecError(f"{where}[{i}].status: expected a string, got {status!r}")
        if "missing" in item and not isinstance(item["missing"], list):
            raise SpecError(f"{where}[{i}].missing: expected a list of span patterns")
        if "group" in item and not isinstance(item["group"], dict):
            raise SpecError(f"{where}[{i}].group: expected a mapping of group_by values")
    return items


# -- one case --------------------------------------------------------------------------------


class _Case:
    def __init__(self, path: Path, document: dict[str, Any], rules: RuleSet, index: int) -> None:
        where = f"tests[{index}]"
        case = check_keys(document["tests"][index], CASE_KEYS, where, required=("name",))
        self.name = str(case["name"])
        self.rules = rules
        idle = document.get("trace_idle")
        self.idle = DEFAULT_IDLE if idle is None else timedelta(
            microseconds=offset_ns(idle, "trace_idle", allow_zero=False) // 1000)
        start = case.get("start_at", document.get("start_at"))
        self.start = DEFAULT_START if start is None else parse_start_at(start, f"{where}.start_at")
        if "spans" in case and "otlp_json" in case:
            raise SpecError(f"{where}: give either 'spans' or 'otlp_json', not both")
        self.labels: dict[str, str] = {}
        self.planned: list[Planned] = []
        if "otlp_json" in case:
            self.planned = read_otlp_json(path.parent / str(case["otlp_json"]))
            if "start_at" not in case and "start_at" not in document:
                earliest = earliest_start_ns(self.planned)
                self.start = self.start if earliest is None else at_ns(earliest)
        elif "spans" in case:
            tree = TreeBuilder(str(path), self.name, ns_of(self.start))
            tree.add(case["spans"], f"{where}.spans")
            self.planned, self.labels = tree.planned, tree.labels
        advance = case.get("advance")
        self.advance = settle_horizon(rules, self.idle) if advance is None else timedelta(
            microseconds=offset_ns(advance, f"{where}.advance") // 1000)
        self.expect_runs = None if case.get("expect_runs") is None else _expectations(
            case["expect_runs"], RUN_KEYS, ("rule", "status"), f"{where}.expect_runs")
        self.expect_incidents = None if case.get("expect_incidents") is None else _expectations(
            case["expect_incidents"], INCIDENT_KEYS, ("rule",), f"{where}.expect_incidents")
        if self.expect_runs is None and self.expect_incidents is None:
            raise SpecError(f"{where}: give expect_runs or expect_incidents (or both)")

    def run(self) -> Verdicts:
        verdicts = Verdicts(IncidentBook.for_rules(self.rules))
        driver = Driver(self.rules, idle=self.idle, start=self.start, grid=GRID,
                        verdicts=verdicts)
        for planned in sorted(self.planned, key=lambda p: (p.deliver_ns, -p.depth, p.order)):
            received = max(planned.deliver_ns, ns_of(driver.now()))
            driver.deliver(batch_from_request(planned.request, received_ns=received))
        driver.advance_to(driver.now() + self.advance)
        return verdicts

    def actual_run(self, record: RunRecord) -> Item:
        item: Item = {"rule": record.rule, "status": record.status.value,
                      "missing": list(record.missing)}
        if record.reason is not None:
            item["reason"] = record.reason.value
        label = self.labels.get(record.trace_id)
        if label is not None and len(set(self.labels.values())) > 1:
            item["trace"] = label
        return item

    def actual_runs(self, verdicts: Verdicts) -> list[tuple[Item, RunRecord]]:
        return [(self.actual_run(r), r) for r in verdicts.runs.values()]


def _run_matches(expected: Item, actual: tuple[Item, RunRecord], labels: dict[str, str]) -> bool:
    item, record = actual
    for key, want in expected.items():
        if key == "missing":
            if sorted(map(str, want)) != sorted(record.missing):
                return False
        elif key == "trace":
            if labels.get(record.trace_id) != str(want):
                return False
        elif item.get(key) != want:
            return False
    return True


def _incident_item(incident: BookIncident) -> Item:
    item: Item = {"rule": incident.rule}
    if incident.group:
        item["group"] = incident.group
    item["failure_count"] = incident.failure_count
    item["status"] = incident.status.value
    return item


def _incident_matches(expected: Item, actual: Item) -> bool:
    return all(actual.get(key, {} if key == "group" else None) == want
               for key, want in expected.items())


def _match(expected: Sequence[Item], actual: Sequence[Any],
           fits: Callable[[Item, Any], bool]) -> dict[int, int]:
    """A maximum matching of expectations to actual items (expected index -> actual index)."""
    owner: dict[int, int] = {}  # actual -> expected

    def augment(e: int, seen: set[int]) -> bool:
        for a in range(len(actual)):
            if a in seen or not fits(expected[e], actual[a]):
                continue
            seen.add(a)
            if a not in owner or augment(owner[a], seen):
                owner[a] = e
                return True
        return False

    for e in range(len(expected)):
        augment(e, set())
    return {e: a for a, e in owner.items()}


def _aligned(expected: Sequence[Item], actual: Sequence[Item], matched: dict[int, int]
             ) -> list[Item]:
    """The actual items in the expectations' order: a matched item where its expectation is
    (rendered as the expectation, since they agree), an unmatched one in place of an unmatched
    expectation of the same rule, the rest at the end."""
    used = set(matched.values())
    spare = [a for a in range(len(actual)) if a not in used]
    ordered: list[Item] = []
    for e, want in enumerate(expected):
        if e in matched:
            ordered.append(want)
            continue
        same_rule = next((a for a in spare if actual[a].get("rule") == want.get("rule")), None)
        if same_rule is not None:
            spare.remove(same_rule)
            ordered.append(actual[same_rule])
    ordered.extend(actual[a] for a in spare)
    return ordered


def _render(sections: dict[str, list[Item]]) -> list[str]:
    lines: list[str] = []
    for title, items in sections.items():
        lines.append(f"{title}:" + ("" if items else " []"))
        for item in items:
            flow = yaml.safe_dump(item, default_flow_style=True, sort_keys=False, width=math.inf)
            lines.append(f"- {flow.strip()}")
    return lines


def run_case(path: Path, document: dict[str, Any], rules: RuleSet, index: int) -> CaseResult:
    name = f"tests[{index}]"
    try:
        case = _Case(path, document, rules, index)
        name = case.name
        verdicts = case.run()
    except SpecError as exc:
        return CaseResult(str(path), name, False, f"error: {exc}")
    except Exception:  # a bug shows up as a failed case, the other cases still run
        return CaseResult(str(path), name, False, traceback.format_exc())
    expected: dict[str, list[Item]] = {}
    actual: dict[str, list[Item]] = {}
    if case.expect_runs is not None:
        runs = case.actual_runs(verdicts)
        matched = _match(case.expect_runs, runs,
                         lambda e, a: _run_matches(e, a, case.labels))
        expected["runs"] = case.expect_runs
        actual["runs"] = _aligned(case.expect_runs, [item for item, _ in runs], matched)
    if case.expect_incidents is not None:
        incidents = [_incident_item(i) for i in verdicts.book.incidents]
        matched = _match(case.expect_incidents, incidents, _incident_matches)
        expected["incidents"] = case.expect_incidents
        actual["incidents"] = _aligned(case.expect_incidents, incidents, matched)
    want, got = _render(expected), _render(actual)
    if want == got:
        return CaseResult(str(path), name, True)
    diff = difflib.unified_diff(want, got, "expected", "actual", lineterm="")
    return CaseResult(str(path), name, False, "\n".join(diff))


def run_file(path: Path) -> list[CaseResult]:
    """The result of every case; a file with problems (see ruletest_check) runs no case and
    gives one failed result holding them all."""
    problems, document, rules = check_test_file(path)
    if problems or document is None or rules is None:
        return [CaseResult(str(path), "(file)", False,
                           problems=tuple(str(p) for p in problems))]
    return [run_case(path, document, rules, i) for i in range(len(document["tests"]))]


def run_test_files(paths: Sequence[str], out: TextIO) -> int:
    """Run every case of every file; print failures with their diffs and ``N passed, M failed``
    last. Returns the exit status: 0 when every case passed, else 1."""
    passed = failed = 0
    for given in paths:
        for result in run_file(Path(given)):
            if result.passed:
                passed += 1
                print(f"PASS {result.file}: {result.name}", file=out)
                continue
            failed += 1
            print(f"FAIL {result.file}: {result.name}", file=out)
            for problem in result.problems:
                print(problem, file=out)
            for line in result.report.splitlines():
                print(f"  {line}", file=out)
    print(f"{passed} passed, {failed} failed", file=out)
    return 0 if failed == 0 else 1


__all__ = ["CaseResult", "run_file", "run_test_files"]
