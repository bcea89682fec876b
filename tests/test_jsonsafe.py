"""jsonsafe.dumps: strict JSON whatever a span attribute held."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from outcomewatch import jsonsafe


def strict(text: str) -> object:
    def refuse(token: str) -> object:
        raise AssertionError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_anywhere_become_strings() -> None:
    value = {"a": float("nan"), "b": [float("-inf"), (1, {"c": float("inf")})], "d": 1.5}
    assert strict(jsonsafe.dumps(value)) == {
        "a": "NaN", "b": ["-Infinity", [1, {"c": "Infinity"}]], "d": 1.5}


def test_finite_values_are_what_json_dumps_writes_and_unknown_objects_their_str() -> None:
    at = datetime(2026, 6, 1, tzinfo=UTC)
    value = {"b": [1, 2.5, None, True], "a": "é", "at": at}
    assert jsonsafe.dumps(value, sort_keys=True) == json.dumps(
        value, ensure_ascii=False, default=str, sort_keys=True)
    assert strict(jsonsafe.dumps(value)) == {"b": [1, 2.5, None, True], "a": "é", "at": str(at)}
