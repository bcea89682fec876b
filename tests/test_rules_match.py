"""Matching spans against selectors, with selectors loaded from YAML as a user writes them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from outcomewatch.model import Span, SpanStatus
from outcomewatch.rules import Selector, load_rules

LoadTrigger = Callable[[str], Selector]


def make_span(
    name: str = "work",
    *,
    service: str = "api",
    status: SpanStatus = SpanStatus.UNSET,
    attributes: dict[str, Any] | None = None,
    resource: dict[str, Any] | None = None,
) -> Span:
    return Span(
        trace_id="0" * 32,
        span_id="1" * 16,
        parent_span_id="",
        name=name,
        service=service,
        kind=1,
        start_ns=0,
        end_ns=1,
        status=status,
        status_message="",
        attributes=attributes or {},
        resource={"service.name": service, **(resource or {})},
    )


@pytest.fixture
def trigger(tmp_path: Path) -> LoadTrigger:
    """Load a rule whose trigger is the given flow-style YAML selector; return that selector."""

    def load(selector: str) -> Selector:
        path = tmp_path / "rules.yaml"
        text = f"rules:\n  - name: r\n    trigger: {selector}\n    expect: [{{span: x}}]\n"
        path.write_text(text)
        return load_rules([path]).rules[0].trigger

    return load


def where(trigger: LoadTrigger, condition: str) -> Selector:
    return trigger(f"{{span: work, where: {{k: {condition}}}}}")


def attr(value: Any) -> Span:
    return make_span(attributes={"k": value})


# --- span name and service -------------------------------------------------------------------


def test_a_plain_span_pattern_matches_only_that_exact_name(trigger: LoadTrigger) -> None:
    selector = trigger("{span: stripe.webhook}")

    assert selector.matches_name("stripe.webhook")
    assert not selector.matches_name("stripe.webhook.retry")
    assert not selector.matches_name("Stripe.webhook")


def test_a_span_glob_matches_with_fnmatch_semantics_case_sensitively(trigger: LoadTrigger) -> None:
    selector = trigger("{span: 'stripe.*'}")

    assert selector.matches_name("stripe.webhook")
    assert selector.matches_name("stripe.")
    assert not selector.matches_name("STRIPE.webhook")
    assert not selector.matches_name("x.stripe.webhook")


def test_question_mark_and_brackets_are_glob_characters_too(trigger: LoadTrigger) -> None:
    selector = trigger("{span: 'job.v[12].?'}")

    assert selector.matches_name("job.v1.a")
    assert selector.matches_name("job.v2.b")
    assert not selector.matches_name("job.v3.a")
    assert not selector.matches_name("job.v1.ab")


def test_matches_checks_the_span_name(trigger: LoadTrigger) -> None:
    assert not trigger("{span: a}").matches(make_span("b"))


def test_a_service_pattern_must_match_the_span_service(trigger: LoadTrigger) -> None:
    selector = trigger("{span: work, service: 'billing-*'}")

    assert selector.matches(make_span(service="billing-worker"))
    assert not selector.matches(make_span(service="web"))


def test_without_a_service_any_service_matches(trigger: LoadTrigger) -> None:
    assert trigger("{span: work}").matches(make_span(service="anything"))


def test_a_status_must_equal_the_span_status(trigger: LoadTrigger) -> None:
    selector = trigger("{span: work, status: ok}")

    assert selector.matches(make_span(status=SpanStatus.OK))
    assert not selector.matches(make_span(status=SpanStatus.ERROR))
    assert not selector.matches(make_span(status=SpanStatus.UNSET))


def test_every_part_of_a_selector_must_hold(trigger: LoadTrigger) -> None:
    selector = trigger("{span: work, service: api, status: error, where: {a: 1, b: x}}")
    good = {"a": 1, "b": "x"}

    assert selector.matches(make_span(status=SpanStatus.ERROR, attributes=good))
    assert not selector.matches(make_span(status=SpanStatus.ERROR, attributes={"a": 1}))
    assert not selector.matches(make_span(status=SpanStatus.OK, attributes=good))


def test_a_selector_can_be_built_directly_with_its_globs_compiled() -> None:
    selector = Selector(span="a.*", service=None, status=None)

    assert selector.matches_name("a.b")
    assert selector == Selector(span="a.*", service=None, status=None)


# --- scalar equality ---------------------------------------------------------------------------


def test_a_string_equals_the_same_string_only(trigger: LoadTrigger) -> None:
    selector = where(trigger, "invoice.payment_failed")

    assert selector.matches(attr("invoice.payment_failed"))
    assert not selector.matches(attr("invoice.paid"))


def test_the_string_one_does_not_equal_the_integer_one(trigger: LoadTrigger) -> None:
    assert not where(trigger, "'1'").matches(attr(1))
    assert not where(trigger, "1").matches(attr("1"))


def test_an_integer_equals_the_same_float(trigger: LoadTrigger) -> None:
    assert where(trigger, "1").matches(attr(1.0))
    assert where(trigger, "1.0").matches(attr(1))


def test_true_does_not_equal_the_integer_one(trigger: LoadTrigger) -> None:
    assert not where(trigger, "true").matches(attr(1))
    assert not where(trigger, "1").matches(attr(True))
    assert where(trigger, "true").matches(attr(True))


def test_equality_fails_when_the_attribute_is_missing(trigger: LoadTrigger) -> None:
    assert not where(trigger, "x").matches(make_span())


def test_where_falls_back_to_resource_attributes(trigger: LoadTrigger) -> None:
    selector = trigger("{span: work, where: {deployment.environment: prod}}")

    assert selector.matches(make_span(resource={"deployment.environment": "prod"}))


def test_a_span_attribute_shadows_the_resource_attribute_of_the_same_key(
    trigger: LoadTrigger,
) -> None:
    selector = where(trigger, "span")

    assert selector.matches(make_span(attributes={"k": "span"}, resource={"k": "resource"}))
    assert not selector.matches(make_span(attributes={"k": "other"}, resource={"k": "span"}))


# --- operators ---------------------------------------------------------------------------------


def test_in_matches_any_listed_value_with_typed_equality(trigger: LoadTrigger) -> None:
    selector = where(trigger, "{in: [payment_failed, dunning, 3]}")

    assert selector.matches(attr("dunning"))
    assert selector.matches(attr(3.0))
    assert not selector.matches(attr("3"))
    assert not selector.matches(make_span())


def test_not_in_matches_values_outside_the_list_and_a_missing_attribute(
    trigger: LoadTrigger,
) -> None:
    selector = where(trigger, "{not_in: [test, staging]}")

    assert selector.matches(attr("prod"))
    assert not selector.matches(attr("staging"))
    assert selector.matches(make_span())


def test_regex_must_match_the_whole_string_value(trigger: LoadTrigger) -> None:
    selector = where(trigger, r"{regex: 'crm\.[a-z_]+'}")

    assert selector.matches(attr("crm.contact_update"))
    assert not selector.matches(attr("crm.contact_update.v2"))
    assert not selector.matches(attr("x.crm.contact"))


def test_regex_never_matches_a_non_string_value(trigger: LoadTrigger) -> None:
    assert not where(trigger, "{regex: '[0-9]+'}").matches(attr(42))


def test_exists_true_requires_the_key_in_span_or_resource(trigger: LoadTrigger) -> None:
    selector = where(trigger, "{exists: true}")

    assert selector.matches(attr(""))
    assert selector.matches(make_span(resource={"k": 1}))
    assert not selector.matches(make_span())


def test_exists_false_requires_the_key_to_be_absent(trigger: LoadTrigger) -> None:
    selector = where(trigger, "{exists: false}")

    assert selector.matches(make_span())
    assert not selector.matches(attr("x"))


def test_ne_matches_other_values_and_values_of_another_type(trigger: LoadTrigger) -> None:
    selector = where(trigger, "{ne: 1}")

    assert selector.matches(attr(2))
    assert selector.matches(attr("1"))
    assert not selector.matches(attr(1.0))


def test_ne_matches_a_missing_attribute_unless_exists_is_required(trigger: LoadTrigger) -> None:
    assert where(trigger, "{ne: x}").matches(make_span())
    assert not where(trigger, "{ne: x, exists: true}").matches(make_span())


@pytest.mark.parametrize(
    ("operator", "matching", "not_matching"),
    [
        ("gt", [6, 5.5], [5, 4]),
        ("gte", [5, 5.0, 6], [4.99]),
        ("lt", [4, 4.9], [5, 6]),
        ("lte", [5, 4], [5.01]),
    ],
)
def test_numeric_comparisons_hold_for_ints_and_floats(
    trigger: LoadTrigger, operator: str, matching: list[float], not_matching: list[float]
) -> None:
    selector = where(trigger, f"{{{operator}: 5}}")

    assert all(selector.matches(attr(value)) for value in matching)
    assert not any(selector.matches(attr(value)) for value in not_matching)


@pytest.mark.parametrize("value", [True, "10", None, [10]])
def test_numeric_comparisons_never_match_bools_strings_or_other_values(
    trigger: LoadTrigger, value: Any
) -> None:
    assert not where(trigger, "{gt: 0}").matches(attr(value))


def test_numeric_comparisons_never_match_a_missing_attribute(trigger: LoadTrigger) -> None:
    assert not where(trigger, "{lt: 100}").matches(make_span())


def test_every_operator_of_a_condition_must_hold(trigger: LoadTrigger) -> None:
    selector = where(trigger, "{gte: 200, lt: 300}")

    assert selector.matches(attr(204))
    assert not selector.matches(attr(300))
    assert not selector.matches(attr(199))
