"""The JSON Schema of a rule file: what `outcomewatch schema` prints for editors and CI."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from outcomewatch.rules import json_schema
from outcomewatch.rules.load import is_rule_test_file

EXAMPLES = Path(__file__).resolve().parent.parent / "rules" / "examples"
EXAMPLE_FILES = sorted(p for p in EXAMPLES.glob("*.yaml") if not is_rule_test_file(p))

needs_jsonschema = pytest.mark.skipif(
    importlib.util.find_spec("jsonschema") is None,
    reason="the jsonschema package is not installed (pip install jsonschema)",
)


def validator() -> Any:
    import jsonschema

    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_schema_is_draft_2020_12_and_describes_a_mapping_with_rules() -> None:
    schema = json_schema()

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["rules"]
    assert schema["additionalProperties"] is False


def test_the_schema_lists_every_rule_key() -> None:
    rule = json_schema()["$defs"]["RuleModel"]

    assert list(rule["properties"]) == [
        "name", "description", "owner", "route", "severity", "trigger", "expect", "forbid",
        "within", "max_duration", "correlate", "group_by", "schedule", "evidence",
        "open_after", "resolve_after", "reopen_within",
    ]
    assert rule["dependentRequired"] == {"correlate": ["within"]}


@needs_jsonschema
@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_each_example_file_validates_against_the_schema(path: Path) -> None:
    errors = [e.message for e in validator().iter_errors(yaml.safe_load(path.read_text()))]

    assert errors == []


@needs_jsonschema
def test_integers_validate_where_a_number_is_expected() -> None:
    # A number is "an int or a float"; in JSON Schema an integer is also a number, so the
    # schema must not say "exactly one of".
    document = {"rules": [{"name": "a", "trigger": {"span": "a", "where": {"k": {"gt": 0}}},
                           "expect": [{"span": "b", "where": {"n": 1}}]}]}

    assert list(validator().iter_errors(document)) == []


@needs_jsonschema
@pytest.mark.parametrize(
    "expect_item",
    [
        {"span": "b", "count": {"gte": -1}},
        {"span": "b", "after": "start"},
        {"span": "b", "duration": {"lt": "2 sec"}},
        {"span": "b", "kind": "server"},
    ],
)
def test_the_schema_refuses_malformed_new_keys(expect_item: dict[str, Any]) -> None:
    document = {"rules": [{"name": "a", "trigger": {"span": "a"}, "expect": [expect_item]}]}

    assert list(validator().iter_errors(document)) != []
