"""model.search_keys: which trigger attribute values a run can be found by."""

from __future__ import annotations

import enum

from outcomewatch.model import MAX_SEARCH_KEYS, MAX_SEARCH_VALUE, AttributeValue, search_keys


class Plan(enum.StrEnum):
    PRO = "pro"


def test_strings_and_ints_as_text_in_order_and_nothing_else() -> None:
    attributes: dict[str, AttributeValue] = {
        "customer.id": "cus_1", "attempt": 0, "paid": True, "empty": "", "ratio": 0.5,
        "tags": ["a"], "long": "x" * (MAX_SEARCH_VALUE + 1), "edge": "y" * MAX_SEARCH_VALUE,
        "plan": Plan.PRO, "big": 2**70}
    assert search_keys(attributes) == (
        ("customer.id", "cus_1"), ("attempt", "0"), ("edge", "y" * MAX_SEARCH_VALUE),
        ("plan", "pro"), ("big", str(2**70)))


def test_at_most_max_search_keys() -> None:
    attributes = {f"k{i}": f"v{i}" for i in range(MAX_SEARCH_KEYS + 5)}
    assert search_keys(attributes) == tuple(
        (f"k{i}", f"v{i}") for i in range(MAX_SEARCH_KEYS))
