"""Rule files -> RuleSet, with every problem located as ``file:line: field.path: message``.

Each file is composed into YAML nodes (which keep line numbers) and constructed from those same
nodes, then validated by the pydantic models in :mod:`outcomewatch.rules.schema`. A pydantic
error's ``loc`` is walked through the node tree to the deepest node that exists, so a missing key
points at its parent and an unknown key points at itself.

Files are read completely before anything is reported: the caller gets every problem of every
file in one go: paths that do not exist first, then each file's in the order the files were
given and, within a file, by line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from outcomewatch.durations import parse_duration
from outcomewatch.errors import Problem, RuleError
from outcomewatch.rules.match import Condition, Rule, RuleSet, Scalar, Selector
from outcomewatch.rules.schema import (
    OPERATORS,
    TAGS,
    ConditionModel,
    RuleFileModel,
    RuleModel,
    SelectorModel,
    keys_at,
)

RULE_SUFFIXES = (".yaml", ".yml")

Loc = tuple[str | int, ...]


def rule_files(paths: Sequence[str | Path]) -> list[Path]:
    """The rule files named by ``paths``, without repeats, in the order given.

    A file is taken as is, whatever its suffix; a directory stands for every ``*.yaml`` and
    ``*.yml`` file below it (recursively), sorted. Raises RuleError listing each path that does
    not exist and each directory without a rule file.
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
    rules, problems = _load(paths)
    if problems:
        raise RuleError(problems)
    return RuleSet(tuple(rules))


def check_paths(paths: Sequence[str | Path]) -> list[Problem]:
    """The problems load_rules would raise for ``paths``; an empty list means they are valid."""
    return _load(paths)[1]


def _expand(paths: Sequence[str | Path]) -> tuple[list[Path], list[Problem]]:
    files: list[Path] = []
    problems: list[Problem] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in RULE_SUFFIXES and p.is_file())
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


def _load(paths: Sequence[str | Path]) -> tuple[list[Rule], list[Problem]]:
    files, problems = _expand(paths)
    rules: list[Rule] = []
    first_defined: dict[str, str] = {}  # rule name -> "file:line" where it was first seen
    for path in files:
        file_rules, file_problems = _load_file(str(path), first_defined)
        rules.extend(file_rules)
        problems.extend(sorted(file_problems, key=lambda p: p.line))
    return rules, problems


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
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        # An error "at the end of the stream" sits past the final newline: name the last line.
        line = min(line, max(1, len(text.splitlines())))
        return [], [Problem(source, line, f"invalid YAML: {_yaml_message(exc)}")]
    except yaml.YAMLError as exc:
        return [], [Problem(source, 1, f"invalid YAML: {exc}")]
    finally:
        loader.dispose()
    if root is None or not isinstance(data, dict):
        return [], [Problem(source, 1, "expected a mapping with a 'rules' list")]

    problems = _duplicate_keys(source, root, ())
    problems += _duplicate_names(source, root, data, first_defined)
    try:
        model = RuleFileModel.model_validate(data)
    except ValidationError as exc:
        problems += [_problem(source, root, data, error) for error in exc.errors()]
        return [], problems
    rules = [
        _compile_rule(rule, source, _locate(root, data, ("rules", i)))
        for i, rule in enumerate(model.rules)
    ]
    return rules, problems


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    parts = [part for part in (exc.context, exc.problem) if part]
    return ", ".join(parts) if parts else "syntax error"


def _duplicate_keys(source: str, node: yaml.Node, loc: Loc) -> list[Problem]:
    """Keys repeated in one mapping: PyYAML would silently keep the last one."""
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key in first_line:
                message = f"duplicate key {key!r} (first at line {first_line[key]})"
                problems.append(Problem(source, line, _at(_path(loc), message)))
            else:
                first_line[key] = line
            problems += _duplicate_keys(source, value_node, (*loc, key))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += _duplicate_keys(source, item, (*loc, index))
    return problems


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
        line = _locate(root, data, ("rules", index, "name"))
        if name in first_defined:
            message = f"duplicate rule name {name!r} (first defined at {first_defined[name]})"
            problems.append(Problem(source, line, f"rules[{index}]: {message}"))
        else:
            first_defined[name] = f"{source}:{line}"
    return problems


def _locate(root: yaml.Node, data: Any, loc: Loc) -> int:
    """The line of the deepest element of ``loc`` present in the file (1 for the root).

    A mapping key's line is the key's own line; a list item's is the item's first line.
    """
    node: yaml.Node | None = root
    line = 1
    for element in loc:
        child_data, child_node, child_line = _child(node, data, element)
        if child_line is None:
            break
        data, node, line = child_data, child_node, child_line
    return line


def _child(
    node: yaml.Node | None, data: Any, element: str | int
) -> tuple[Any, yaml.Node | None, int | None]:
    if isinstance(data, list) and isinstance(element, int) and 0 <= element < len(data):
        item = node.value[element] if isinstance(node, yaml.SequenceNode) else None
        return data[element], item, _line(item)
    if isinstance(data, dict) and element in data:
        line = None
        value_node = None
        if isinstance(node, yaml.MappingNode):
            # The last pair wins, as it does when PyYAML constructs a mapping.
            for key_node, candidate in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(element):
                    line, value_node = _line(key_node), candidate
        return data[element], value_node, line if line is not None else _line(node)
    return None, None, None


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _path(loc: Loc, data: Any = None) -> str:
    """``loc`` written as in the messages: ``rules[0].expect[1].where.email.template``.

    With ``data`` (the constructed file), a mapping key that is not a plain string is shown as
    ``[3]`` or ``['']`` and only list positions use bare ``[i]``.
    """
    text = ""
    for element in loc:
        in_list = isinstance(data, list) if data is not None else isinstance(element, int)
        if in_list:
            text += f"[{element}]"
        elif isinstance(element, str) and element:
            text += f".{element}"
        else:
            text += f"[{element!r}]"
        data = _child(None, data, element)[0] if data is not None else None
    return text.lstrip(".")


def _at(path: str, message: str) -> str:
    return f"{path}: {message}" if path else message


def _problem(source: str, root: yaml.Node, data: Any, error: ErrorDetails) -> Problem:
    loc: Loc = tuple(part for part in error["loc"] if part not in TAGS)
    kind = error["type"]
    is_key = bool(loc) and loc[-1] == "[key]"  # pydantic's marker for an invalid dict key
    if is_key:
        loc = loc[:-1]
    line = _locate(root, data, loc)
    if kind == "missing":
        return Problem(source, line, _at(_path(loc[:-1], data), f"{loc[-1]!r} is required"))
    if kind == "extra_forbidden":
        expected = keys_at(loc[:-1])
        noun = "operator" if expected == OPERATORS else "key"
        message = f"unknown {noun} {loc[-1]!r}"
        if expected:
            message += f" (expected one of: {', '.join(expected)})"
        return Problem(source, line, _at(_path(loc[:-1], data), message))
    message = _message(error)
    if is_key:
        message = f"invalid key: {message}"
    return Problem(source, line, _at(_path(loc, data), message))


def _message(error: ErrorDetails) -> str:
    kind, given = error["type"], error["input"]
    expected = _EXPECTED.get(kind)
    if expected is not None:
        return f"expected {expected}, got {_describe(given)}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind == "enum":
        return f"invalid value {given!r} (expected {error.get('ctx', {}).get('expected')})"
    if kind in ("scalar_type", "number_type", "condition_type"):
        return f"{error['msg']}, got {_describe(given)}"
    return error["msg"]


_EXPECTED = {
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {str(value).lower()}"
    if isinstance(value, int | float | str):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _compile_rule(model: RuleModel, source: str, line: int) -> Rule:
    return Rule(
        name=model.name,
        description=model.description,
        owner=model.owner,
        route=model.route,
        severity=model.severity,
        trigger=_compile_selector(model.trigger),
        expect=tuple(_compile_selector(item) for item in model.expect),
        within=parse_duration(model.within) if model.within is not None else None,
        evidence=tuple(model.evidence),
        source=source,
        line=line,
    )


def _compile_selector(model: SelectorModel) -> Selector:
    return Selector(
        span=model.span,
        service=model.service,
        status=model.status,
        where=tuple(_compile_condition(key, value) for key, value in model.where.items()),
    )


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
