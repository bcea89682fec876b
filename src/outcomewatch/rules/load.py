"""Rule files -> RuleSet, with every problem located as ``file:line:column: field.path: message``.

Each file is composed into YAML nodes (which keep positions) and constructed from those same
nodes, then validated by the pydantic models in :mod:`outcomewatch.rules.schema`; errors are
located and phrased by :mod:`outcomewatch.rules.problems`.

Files are read completely before anything is reported: the caller gets every problem of every
file in one go: paths that do not exist first, then each file's in the order the files were
given and, within a file, by line and column.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from outcomewatch.durations import parse_duration
from outcomewatch.errors import Problem, RuleError
from outcomewatch.rules.match import (
    Bounds,
    Condition,
    DurationBounds,
    Rule,
    RuleSet,
    Scalar,
    Selector,
)
from outcomewatch.rules.problems import duplicate_keys, keys_at, locate, problems_from, suggest
from outcomewatch.rules.schedule import Schedule
from outcomewatch.rules.schema import (
    CORRELATE_NEEDS_WITHIN,
    ConditionModel,
    CountModel,
    DurationBoundsModel,
    ExpectModel,
    RuleFileModel,
    RuleModel,
    ScheduleModel,
    SelectorModel,
)

RULE_SUFFIXES = (".yaml", ".yml")
RULE_KEYS = keys_at(("rules", 0))


def is_rule_test_file(path: Path) -> bool:
    """``*.test.yaml`` / ``*.test.yml``: an ``outcomewatch test`` file, kept beside the rules it
    tests (as promtool users keep theirs) and so skipped when a directory is loaded as rules."""
    return path.name.endswith((".test.yaml", ".test.yml"))


def rule_files(paths: Sequence[str | Path]) -> list[Path]:
    """The rule files named by ``paths``, without repeats, in the order given.

    A file is taken as is, whatever its suffix; a directory stands for every ``*.yaml`` and
    ``*.yml`` file below it (recursively), sorted, except rule test files (``*.test.yaml``).
    Raises RuleError listing each path that does not exist and each directory without a rule
    file.
    """
    files, problems = _expand(paths)
    if problems:
        raise RuleError(problems)
    return files


def load_rules(paths: Sequence[str | Path]) -> RuleSet:
    """Load and compile every rule in ``paths`` (see rule_files).

    Raises RuleError whose ``problems`` lists every problem found in every file, including rule
    names defined more than once across the files.
    """
    rules, problems = check_rules(paths)
    if problems:
        raise RuleError(problems)
    return RuleSet(tuple(rules))


def check_paths(paths: Sequence[str | Path]) -> list[Problem]:
    """The problems load_rules would raise for ``paths``; an empty list means they are valid."""
    return check_rules(paths)[1]


def check_rules(paths: Sequence[str | Path]) -> tuple[list[Rule], list[Problem]]:
    """Every rule that compiled, and every problem (as load_rules would raise them).

    A file with a problem other than a duplicate rule name contributes no rule.
    """
    files, problems = _expand(paths)
    rules: list[Rule] = []
    first_defined: dict[str, str] = {}  # rule name -> "file:line" where it was first seen
    for path in files:
        file_rules, file_problems = _load_file(str(path), first_defined)
        rules.extend(file_rules)
        problems.extend(sorted(file_problems, key=lambda p: (p.line, p.column)))
    return rules, problems


def _expand(paths: Sequence[str | Path]) -> tuple[list[Path], list[Problem]]:
    files: list[Path] = []
    problems: list[Problem] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in RULE_SUFFIXES
                           and p.is_file() and not is_rule_test_file(p))
            if not found:
                problems.append(Problem(str(path), 1, "no rule files (*.yaml, *.yml) in directory"))
        elif path.exists():
            found = [path]
        else:
            problems.append(Problem(str(path), 1, "no such file or directory"))
            continue
        for file in found:
            # The same file named twice (directly and through its directory) is loaded once,
            # rather than reporting each of its rules as a duplicate of itself.
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    return files, problems


def _load_file(source: str, first_defined: dict[str, str]) -> tuple[list[Rule], list[Problem]]:
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Problem(source, 1, f"cannot read rule file: {exc}")]
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        return [], [_yaml_problem(source, text, exc)]
    except yaml.YAMLError as exc:
        return [], [Problem(source, 1, f"invalid YAML: {exc}")]
    finally:
        loader.dispose()
    if root is None or not isinstance(data, dict):
        return [], [Problem(source, 1, "expected a mapping with a 'rules' list")]

    problems = duplicate_keys(source, root)
    problems += _duplicate_names(source, root, data, first_defined)
    problems += _correlate_without_within(source, root, data)
    try:
        model = RuleFileModel.model_validate(data)
    except ValidationError as exc:
        problems += problems_from(source, root, data, exc.errors())
        # The correlate check above also runs in the model, where it is skipped for a rule
        # with other errors; each problem is reported once.
        return [], list(dict.fromkeys(problems))
    rules = [
        _compile_rule(rule, source, locate(root, data, ("rules", i))[0])
        for i, rule in enumerate(model.rules)
    ]
    return rules, problems


def _yaml_problem(source: str, text: str, exc: yaml.MarkedYAMLError) -> Problem:
    parts = [part for part in (exc.context, exc.problem) if part]
    message = f"invalid YAML: {', '.join(parts) if parts else 'syntax error'}"
    if exc.context == "while scanning an alias":
        # `cron: */15 * * * *`: a plain value that starts with '*' is an alias in YAML.
        message += " (quote a value that starts with '*', like \"*/15 * * * *\")"
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return Problem(source, 1, message)
    last_line = max(1, len(text.splitlines()))
    if mark.line + 1 > last_line:
        # An error "at the end of the stream" sits past the final newline: name the last line.
        return Problem(source, last_line, message)
    return Problem(source, mark.line + 1, message, mark.column + 1)


def _duplicate_names(
    source: str, root: yaml.Node, data: dict[Any, Any], first_defined: dict[str, str]
) -> list[Problem]:
    """Rule names already seen in this or an earlier file; records the new ones."""
    items = data.get("rules")
    if not isinstance(items, list):
        return []
    problems: list[Problem] = []
    for index, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            continue
        line, column = locate(root, data, ("rules", index, "name"))
        if name in first_defined:
            message = f"duplicate rule name {name!r} (first defined at {first_defined[name]})"
            problems.append(Problem(source, line, f"rules[{index}]: {message}", column))
        else:
            first_defined[name] = f"{source}:{line}"
    return problems


def _correlate_without_within(source: str, root: yaml.Node, data: dict[Any, Any]) -> list[Problem]:
    """Rules with ``correlate`` but no ``within``, found even when the rule has other errors.

    A rule with a misspelt ``within`` is left to the unknown-key problem that names it.
    """
    items = data.get("rules")
    problems: list[Problem] = []
    for index, item in enumerate(items if isinstance(items, list) else []):
        if (
            isinstance(item, dict)
            and item.get("correlate") is not None
            and item.get("within") is None
            and not any(suggest(str(key), ["within"]) for key in item if key not in RULE_KEYS)
        ):
            line, column = locate(root, data, ("rules", index, "correlate"))
            message = f"rules[{index}].correlate: {CORRELATE_NEEDS_WITHIN}"
            problems.append(Problem(source, line, message, column))
    return problems


def _compile_rule(model: RuleModel, source: str, line: int) -> Rule:
    return Rule(
        name=model.name,
        description=model.description,
        owner=model.owner,
        route=model.route,
        severity=model.severity,
        trigger=_compile_selector(model.trigger),
        expect=tuple(_compile_selector(item) for item in model.expect),
        within=_duration(model.within),
        evidence=tuple(model.evidence),
        source=source,
        line=line,
        forbid=tuple(_compile_selector(item) for item in model.forbid),
        correlate=tuple(model.correlate.by) if model.correlate is not None else (),
        max_duration=_duration(model.max_duration),
        schedule=_compile_schedule(model.schedule) if model.schedule is not None else None,
        group_by=tuple(model.group_by or ()),
        open_after=model.open_after,
        resolve_after=model.resolve_after,
        reopen_within=_duration(model.reopen_within),
    )


def _duration(text: str | None) -> timedelta | None:
    return parse_duration(text) if text is not None else None


def _compile_selector(model: SelectorModel) -> Selector:
    count = model.count if isinstance(model, ExpectModel) else None
    return Selector(
        span=model.span,
        service=model.service,
        status=model.status,
        where=tuple(_compile_condition(key, value) for key, value in model.where.items()),
        count=_compile_count(count) if count is not None else None,
        after_trigger=isinstance(model, ExpectModel) and model.after == "trigger",
        duration=_compile_duration(model.duration) if model.duration is not None else None,
    )


def _compile_count(model: CountModel) -> Bounds:
    return Bounds(gte=model.gte, lte=model.lte)


def _compile_duration(model: DurationBoundsModel) -> DurationBounds:
    return DurationBounds(
        lt=_duration(model.lt), lte=_duration(model.lte), gt=_duration(model.gt),
        gte=_duration(model.gte),
    )


def _compile_schedule(model: ScheduleModel) -> Schedule:
    return Schedule(cron=model.cron, tz=model.tz, grace=parse_duration(model.grace))


def _compile_condition(key: str, value: Scalar | ConditionModel) -> Condition:
    if not isinstance(value, ConditionModel):
        return Condition(key=key, equals=value)
    return Condition(
        key=key,
        in_=tuple(value.in_) if value.in_ is not None else None,
        not_in=tuple(value.not_in) if value.not_in is not None else None,
        regex=re.compile(value.regex) if value.regex is not None else None,
        exists=value.exists,
        ne=value.ne,
        gt=value.gt,
        gte=value.gte,
        lt=value.lt,
        lte=value.lte,
    )
