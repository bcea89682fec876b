"""Problems of a rule file, located at ``line:column`` and phrased as ``field.path: message``.

A pydantic error's ``loc`` is walked through the YAML node tree to the deepest node that exists,
so a missing key points at its parent mapping and an unknown key at the key itself. Lines and
columns are 1-based, taken from the node's ``start_mark``.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic_core import ErrorDetails

from outcomewatch.errors import Problem
from outcomewatch.rules.schema import (
    AT,
    EXPECT_ONLY,
    ConditionModel,
    CountModel,
    DurationBoundsModel,
    RuleFileModel,
    SelectorModel,
)
from outcomewatch.rules.values import TAGS

Loc = tuple[str | int, ...]
Position = tuple[int, int]  # (line, column), both 1-based


def problems_from(
    source: str, root: yaml.Node, data: Any, errors: Sequence[ErrorDetails]
) -> list[Problem]:
    """One problem per pydantic error, except a required key that a misspelt key stands for.

    ``expcet: [...]`` gives both "unknown key 'expcet'" and "'expect' is required"; the first
    (which suggests 'expect') says it all.
    """
    located = [(_loc(error), error) for error in errors]
    suggested = {
        (*loc[:-1], suggestion)
        for loc, error in located
        if error["type"] == "extra_forbidden"
        and (suggestion := suggest(str(loc[-1]), keys_at(loc[:-1]))) is not None
    }
    return [
        _problem(source, root, data, loc, error)
        for loc, error in located
        if not (error["type"] == "missing" and loc in suggested)
    ]


def duplicate_keys(source: str, node: yaml.Node, loc: Loc = ()) -> list[Problem]:
    """Keys repeated in one mapping: PyYAML would silently keep the last one."""
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line, column = key_node.start_mark.line + 1, key_node.start_mark.column + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key in first_line:
                message = f"duplicate key {key!r} (first at line {first_line[key]})"
                problems.append(Problem(source, line, at(path(loc), message), column))
            else:
                first_line[key] = line
            problems += duplicate_keys(source, value_node, (*loc, key))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += duplicate_keys(source, item, (*loc, index))
    return problems


def locate(root: yaml.Node, data: Any, loc: Loc, *, value: bool = False) -> Position:
    """Where the deepest element of ``loc`` present in the file starts ((1, 1) for the root).

    A mapping key's position is the key's own; a list item's is where the item starts. With
    ``value``, a scalar found at the whole of ``loc`` is located at itself rather than its key:
    that is where a wrong value is.
    """
    node: yaml.Node | None = root
    position = (1, 1)
    for element in loc:
        child_data, child_node, child_position = _child(node, data, element)
        if child_position is None:
            return position
        data, node, position = child_data, child_node, child_position
    if value and isinstance(node, yaml.ScalarNode):
        return _position(node) or position
    return position


def path(loc: Loc, data: Any = None) -> str:
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


def at(field_path: str, message: str) -> str:
    return f"{field_path}: {message}" if field_path else message


def keys_at(loc: Loc) -> tuple[str, ...]:
    """The keys allowed in the mapping at ``loc`` (a pydantic loc without tags) of a rule file.

    Found by walking the models' annotations, so it follows the schema; () if ``loc`` does not
    lead to a model.
    """
    model = _model_at(loc)
    if model is None:
        return ()
    return tuple(field.alias or name for name, field in model.model_fields.items())


def _model_at(loc: Loc) -> type[BaseModel] | None:
    annotation: Any = RuleFileModel
    for element in loc:
        annotation = _annotation_child(annotation, element)
        if annotation is None:
            return None
    for candidate in _members(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def suggest(key: str, allowed: Sequence[str]) -> str | None:
    """The allowed key closest to a misspelt ``key``, if one is close enough."""
    close = difflib.get_close_matches(key, allowed, n=1)
    return close[0] if close else None


def _loc(error: ErrorDetails) -> Loc:
    loc: Loc = tuple(part for part in error["loc"] if part not in TAGS)
    extra = (error.get("ctx") or {}).get(AT)
    return (*loc, extra) if isinstance(extra, str) else loc


def _child(
    node: yaml.Node | None, data: Any, element: str | int
) -> tuple[Any, yaml.Node | None, Position | None]:
    if isinstance(data, list) and isinstance(element, int) and 0 <= element < len(data):
        item = node.value[element] if isinstance(node, yaml.SequenceNode) else None
        return data[element], item, _position(item)
    if isinstance(data, dict) and element in data:
        position = None
        value_node = None
        if isinstance(node, yaml.MappingNode):
            # The last pair wins, as it does when PyYAML constructs a mapping.
            for key_node, candidate in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(element):
                    position, value_node = _position(key_node), candidate
        return data[element], value_node, position if position is not None else _position(node)
    return None, None, None


def _position(node: yaml.Node | None) -> Position | None:
    if node is None:
        return None
    return node.start_mark.line + 1, node.start_mark.column + 1


def _problem(source: str, root: yaml.Node, data: Any, loc: Loc, error: ErrorDetails) -> Problem:
    kind = error["type"]
    is_key = bool(loc) and loc[-1] == "[key]"  # pydantic's marker for an invalid dict key
    if is_key:
        loc = loc[:-1]
    at_value = not is_key and kind not in ("missing", "extra_forbidden")
    line, column = locate(root, data, loc, value=at_value)
    if kind == "missing":
        message = at(path(loc[:-1], data), f"{loc[-1]!r} is required")
    elif kind == "extra_forbidden":
        message = at(path(loc[:-1], data), _unknown_key(str(loc[-1]), loc[:-1]))
    else:
        message = _message(error)
        message = at(path(loc, data), f"invalid key: {message}" if is_key else message)
    return Problem(source, line, message, column)


def _unknown_key(key: str, parent: Loc) -> str:
    model, expected = _model_at(parent), keys_at(parent)
    noun = _NOUNS.get(model, "key") if model is not None else "key"
    message = f"unknown {noun} {key!r}"
    if model is SelectorModel and key in EXPECT_ONLY:
        return f"{message}: {key!r} is only allowed on an 'expect' item"
    suggestion = suggest(key, expected)
    if suggestion is not None:
        message += f": did you mean {suggestion!r}?"
    if expected:
        message += f" (expected one of: {', '.join(expected)})"
    return message


def _message(error: ErrorDetails) -> str:
    kind, given, ctx = error["type"], error["input"], error.get("ctx") or {}
    expected = _EXPECTED.get(kind)
    if expected is not None:
        return f"expected {expected}, got {_describe(given)}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind in ("enum", "literal_error"):
        return f"invalid value {given!r} (expected {ctx.get('expected')})"
    if kind == "greater_than_equal":
        return f"must be {ctx.get('ge')} or more, got {_describe(given)}"
    if kind in ("scalar_type", "number_type", "condition_type"):
        return f"{error['msg']}, got {_describe(given)}"
    return error["msg"]


_NOUNS: dict[type[BaseModel], str] = {
    ConditionModel: "operator",
    CountModel: "bound",
    DurationBoundsModel: "bound",
}

_EXPECTED = {
    "string_type": "a string",
    "bool_type": "true or false",
    "int_type": "an integer",
    "keys_type": "an attribute key or a list of them",
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


def _members(annotation: Any) -> list[Any]:
    """``annotation`` with Annotated and unions unwrapped into their member types."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def _annotation_child(annotation: Any, element: str | int) -> Any:
    for candidate in _members(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            for name, field in candidate.model_fields.items():
                if element in (name, field.alias):
                    return field.annotation
        origin = get_origin(candidate)
        if origin is list and isinstance(element, int):
            return get_args(candidate)[0]
        if origin is dict:
            return get_args(candidate)[1]
    return None
