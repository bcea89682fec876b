"""Validation of a rule test file before any case runs, strict as ``promtool test rules``:
every problem of the file at once, each located as ``file:line:col: message``.

Besides the shape of the file (known keys, required keys, types, durations, times), an expected
run or incident that names a rule no rule file defines, or a status or reason that does not
exist, is a problem of the file rather than a diff: such an expectation could never match.

The checks call the same parsers the cases use (``spans.check_keys``, ``offset_ns``,
``TreeBuilder``, ``read_otlp_json``), so a file that passes here parses when it runs. Their
errors name a path (``tests[0].spans[1].start: ...``), which is located in the YAML's node tree.
A span tree reports its first problem only (TreeBuilder stops there).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from outcomewatch.durations import bare_number_message
from outcomewatch.errors import Problem
from outcomewatch.model import FailureReason, IncidentStatus, RunStatus
from outcomewatch.offline.spans import (
    SpecError,
    TreeBuilder,
    check_keys,
    offset_ns,
    read_otlp_json,
)
from outcomewatch.rules import RuleSet, check_rules

FILE_KEYS = ("rule_files", "trace_idle", "start_at", "tests")
CASE_KEYS = ("name", "start_at", "spans", "otlp_json", "advance", "expect_runs",
             "expect_incidents")
RUN_KEYS = ("rule", "status", "missing", "reason", "trace")
INCIDENT_KEYS = ("rule", "failure_count", "group", "status")
_INDEX = re.compile(r"\[(\d+)\]")
_UNKNOWN_KEY = re.compile(r"unknown key '([^']*)'")


def parse_start_at(value: Any, where: str) -> datetime:
    """A case's ``start_at`` as a UTC datetime; raises SpecError naming ``where``."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise SpecError(f"{where}: expected an ISO 8601 time like 2026-11-24T00:59:00Z, "
                            f"got {value!r}") from None
    else:
        raise SpecError(f"{where}: expected an ISO 8601 time, got {value!r}")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _one_of(value: str, allowed: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(value, allowed, n=1)
    hint = f": did you mean {close[0]!r}?" if close else ""
    return f"{what} {value!r} does not exist{hint} (expected one of: {', '.join(allowed)})"


class _Locator:
    """file:line:col of a path like ``tests[0].spans[1].start`` in the composed YAML."""

    def __init__(self, file: str, root: yaml.Node | None) -> None:
        self.file, self.root = file, root

    def node(self, where: str) -> yaml.Node | None:
        node, rest = self.root, where
        while rest and node is not None:
            if rest.startswith("["):
                match = _INDEX.match(rest)
                if match is None or not isinstance(node, yaml.SequenceNode):
                    break
                index = int(match.group(1))
                if index >= len(node.value):
                    break
                node, rest = node.value[index], rest[match.end():]
                continue
            rest = rest.removeprefix(".")
            if not isinstance(node, yaml.MappingNode):
                break
            # Keys may hold dots (attribute keys): take the longest key the path starts with.
            found = None
            for key, value in node.value:
                text = str(key.value)
                if (rest == text or rest.startswith((text + ".", text + "["))) and (
                        found is None or len(text) > len(found[0])):
                    found = (text, value)
            if found is None:
                break
            node, rest = found[1], rest[len(found[0]):]
        return node

    def key(self, where: str, key: str) -> yaml.Node | None:
        mapping = self.node(where)
        if isinstance(mapping, yaml.MappingNode):
            for key_node, _ in mapping.value:
                if str(key_node.value) == key:
                    return key_node  # type: ignore[no-any-return]
        return mapping

    def problem(self, where: str, message: str, *, key: str | None = None) -> Problem:
        node = self.key(where, key) if key is not None else self.node(where)
        if node is None:
            return Problem(self.file, 1, message)
        mark = node.start_mark
        return Problem(self.file, mark.line + 1, message, mark.column + 1)

    def spec_error(self, exc: SpecError) -> Problem:
        """A parser's error, located at the path it names (at the key, for an unknown key)."""
        text = str(exc)
        where, sep, _ = text.partition(": ")
        if not sep or (" " in where and not where.startswith("test file")):
            return Problem(self.file, 1, text)
        where = "" if where == "test file" else where
        unknown = _UNKNOWN_KEY.search(text)
        return self.problem(where, text, key=unknown.group(1) if unknown else None)


class _Checker:
    def __init__(self, path: Path, locate: _Locator) -> None:
        self.path, self.locate = path, locate
        self.problems: list[Problem] = []
        self.rule_names: set[str] | None = None  # None: the rules did not load, names unknown

    def guard(self, check: Callable[[], Any]) -> Any:
        """Run one parser; its SpecError becomes a located problem (None is returned)."""
        try:
            return check()
        except SpecError as exc:
            self.problems.append(self.locate.spec_error(exc))
            return None

    def at(self, where: str, message: str, *, key: str | None = None) -> None:
        self.problems.append(self.locate.problem(where, f"{where}: {message}" if where
                                                 else message, key=key))

    def keys(self, value: Any, allowed: Sequence[str], where: str,
             required: Sequence[str] = ()) -> dict[str, Any] | None:
        """Every unknown and every missing key of one mapping (not only the first)."""
        if not isinstance(value, dict):
            self.guard(lambda: check_keys(value, allowed, where or "test file"))
            return None
        for key in value:
            if key not in allowed:
                self.guard(partial(check_keys, {key: None}, allowed, where or "test file"))
        for key in required:
            if key not in value:
                self.at(where, f"{key!r} is required")
        return value

    def rules(self, document: dict[str, Any]) -> RuleSet | None:
        rule_files = document.get("rule_files")
        if isinstance(rule_files, str):
            rule_files = [rule_files]
        if not isinstance(rule_files, list) or not rule_files or not all(
                isinstance(f, str) for f in rule_files):
            self.at("rule_files", "expected a non-empty list of paths")
            return None
        rules, problems = check_rules([self.path.parent / f for f in rule_files])
        self.problems.extend(problems)
        if problems:
            return None
        self.rule_names = {rule.name for rule in rules}
        return RuleSet(tuple(rules))

    def rule(self, item: dict[str, Any], where: str) -> None:
        name = item.get("rule")
        if name is None or self.rule_names is None:
            return
        if not isinstance(name, str) or name not in self.rule_names:
            close = difflib.get_close_matches(str(name), sorted(self.rule_names), n=1)
            hint = f": did you mean {close[0]!r}?" if close else ""
            self.at(f"{where}.rule", f"no rule file defines a rule {name!r}{hint}")

    def choice(self, item: dict[str, Any], key: str, allowed: Sequence[str], where: str,
               what: str) -> None:
        value = item.get(key)
        if value is None:
            return
        if not isinstance(value, str) or value not in allowed:
            self.at(f"{where}.{key}", _one_of(str(value), allowed, what))

    def expectations(self, value: Any, keys: Sequence[str], required: Sequence[str],
                     where: str, statuses: Sequence[str], what: str) -> None:
        if not isinstance(value, list):
            self.at(where, "expected a list")
            return
        for i, raw in enumerate(value):
            item = self.keys(raw, keys, f"{where}[{i}]", required)
            if item is None:
                continue
            here = f"{where}[{i}]"
            self.rule(item, here)
            self.choice(item, "status", statuses, here, f"{what} status")
            if "reason" in item:
                self.choice(item, "reason", [r.value for r in FailureReason], here, "reason")
            if "missing" in item and not isinstance(item["missing"], list):
                self.at(f"{here}.missing", "expected a list of span patterns")
            if "group" in item and not isinstance(item["group"], dict):
                self.at(f"{here}.group", "expected a mapping of group_by values")
            count = item.get("failure_count")
            if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                      or count < 0):
                self.at(f"{here}.failure_count", f"expected an integer >= 0, got {count!r}")

    def case(self, raw: Any, index: int, document: dict[str, Any]) -> None:
        where = f"tests[{index}]"
        case = self.keys(raw, CASE_KEYS, where, ("name",))
        if case is None:
            return
        for key in ("start_at",):
            if key in case:
                self.start_at(case[key], f"{where}.{key}")
        if "advance" in case:
            self.duration(case["advance"], f"{where}.advance", allow_zero=True)
        if "spans" in case and "otlp_json" in case:
            self.at(where, "give either 'spans' or 'otlp_json', not both", key="otlp_json")
        elif "spans" in case:
            tree = TreeBuilder(str(self.path), str(case.get("name")), 0)
            self.guard(lambda: tree.add(case["spans"], f"{where}.spans"))
        elif "otlp_json" in case:
            file = case["otlp_json"]
            self.guard(lambda: read_otlp_json(self.path.parent / str(file)))
        if case.get("expect_runs") is None and case.get("expect_incidents") is None:
            self.at(where, "give expect_runs or expect_incidents (or both)")
        if case.get("expect_runs") is not None:
            self.expectations(case["expect_runs"], RUN_KEYS, ("rule", "status"),
                              f"{where}.expect_runs", [s.value for s in RunStatus], "run")
        if case.get("expect_incidents") is not None:
            self.expectations(case["expect_incidents"], INCIDENT_KEYS, ("rule",),
                              f"{where}.expect_incidents", [s.value for s in IncidentStatus],
                              "incident")

    def duration(self, value: Any, where: str, *, allow_zero: bool) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and value != 0:
            self.at(where, bare_number_message(value))
        else:
            self.guard(lambda: offset_ns(value, where, allow_zero=allow_zero))

    def start_at(self, value: Any, where: str) -> None:
        self.guard(lambda: parse_start_at(value, where))


def check_test_file(path: Path) -> tuple[list[Problem], dict[str, Any] | None, RuleSet | None]:
    """Every problem of the test file at ``path`` (sorted by line), else no problems, the
    parsed document and the rules its ``rule_files`` define."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
        document = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(file, 1, f"cannot read test file: {exc}")], None, None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        return [Problem(file, line, f"invalid YAML: {exc.problem or exc}", column)], None, None
    except yaml.YAMLError as exc:
        return [Problem(file, 1, f"invalid YAML: {exc}")], None, None
    checker = _Checker(path, _Locator(file, root))
    if checker.keys(document, FILE_KEYS, "", ("rule_files", "tests")) is None:
        return checker.problems, None, None
    rules = checker.rules(document) if "rule_files" in document else None
    if "trace_idle" in document:
        checker.duration(document["trace_idle"], "trace_idle", allow_zero=False)
    if "start_at" in document:
        checker.start_at(document["start_at"], "start_at")
    tests = document.get("tests")
    if "tests" in document and not isinstance(tests, list):
        checker.at("tests", "expected a list of cases")
    elif isinstance(tests, list):
        for index, raw in enumerate(tests):
            checker.case(raw, index, document)
    problems = sorted(checker.problems, key=lambda p: (p.file != file, p.file, p.line,
                                                       p.column))
    return problems, (document if not problems else None), rules


__all__ = ["check_test_file"]
