"""The shipped example rules load, and each one matches the spans its story describes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from outcomewatch.model import Span, SpanStatus
from outcomewatch.rules import Rule, check_paths, load_rules

EXAMPLES = Path(__file__).resolve().parent.parent / "rules" / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))

OK, ERROR = SpanStatus.OK, SpanStatus.ERROR


def make_span(
    name: str, status: SpanStatus = SpanStatus.UNSET, attributes: dict[str, Any] | None = None
) -> Span:
    return Span(
        trace_id="0" * 32,
        span_id="1" * 16,
        parent_span_id="",
        name=name,
        service="svc",
        kind=1,
        start_ns=0,
        end_ns=1,
        status=status,
        status_message="",
        attributes=attributes or {},
        resource={"service.name": "svc"},
    )


def rule(name: str) -> Rule:
    found = load_rules([EXAMPLES]).by_name(name)
    assert found is not None
    return found


def satisfied(rule: Rule, spans: list[Span]) -> list[bool]:
    """For each expectation of ``rule``, whether some span of ``spans`` matches it."""
    return [any(selector.matches(span) for span in spans) for selector in rule.expect]


def test_there_is_one_example_file_per_seed_story() -> None:
    assert [p.name for p in EXAMPLE_FILES] == [
        "01-payment-failed-access.yaml",
        "02-report-delivered.yaml",
        "03-model-batch-visible.yaml",
        "04-queue-reconciled.yaml",
        "05-backup-restore-proven.yaml",
    ]


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_each_example_file_loads_without_problems(path: Path) -> None:
    assert check_paths([path]) == []


def test_all_examples_load_together_with_unique_names() -> None:
    assert len(load_rules([EXAMPLES]).rules) == len(EXAMPLE_FILES)


def test_payment_failed_needs_access_changed_and_a_dunning_email() -> None:
    payment = rule("payment-failed-updates-access")

    assert not payment.trigger.matches(
        make_span("stripe.webhook", OK, {"event.type": "invoice.paid"})
    )
    assert payment.trigger.matches(
        make_span("stripe.webhook", OK, {"event.type": "invoice.payment_failed"})
    )
    assert satisfied(
        payment,
        [
            make_span("entitlement.updated", OK),
            make_span("email.delivered", OK, {"email.template": "dunning"}),
        ],
    ) == [True, True]
    assert satisfied(
        payment,
        [
            make_span("entitlement.updated", ERROR),
            make_span("email.delivered", OK, {"email.template": "welcome"}),
        ],
    ) == [False, False]
    assert payment.evidence == ("subscription.id", "customer.id")
    assert payment.within == timedelta(minutes=10)


def test_a_scheduled_report_needs_a_delivered_email() -> None:
    report = rule("scheduled-report-delivered")

    assert report.trigger.matches(make_span("report.generate", OK, {"report.schedule": "daily"}))
    assert not report.trigger.matches(make_span("report.generate", OK))
    assert satisfied(report, [make_span("email.delivered", OK)]) == [True]
    assert satisfied(report, [make_span("email.delivered", ERROR)]) == [False]


def test_a_model_batch_needs_validated_persisted_and_published_results() -> None:
    batch = rule("model-batch-results-visible")

    assert batch.trigger.matches(make_span("batch.process", OK, {"batch.size": 32}))
    assert not batch.trigger.matches(make_span("batch.process", OK, {"batch.size": 0}))
    spans = [make_span("result.validated", OK), make_span("result.persisted", ERROR)]
    assert satisfied(batch, spans) == [True, False, False]


def test_a_crm_task_needs_a_2xx_external_update_and_reconciliation() -> None:
    crm = rule("crm-sync-reconciled")

    assert crm.trigger.matches(make_span("queue.consume", OK, {"task.type": "crm.contact_update"}))
    assert not crm.trigger.matches(make_span("queue.consume", OK, {"task.type": "email.send"}))
    rejected = make_span("external.update", OK, {"http.response.status_code": 422})
    accepted = make_span("external.update", OK, {"http.response.status_code": 200})
    assert satisfied(crm, [rejected, make_span("state.reconciled", OK)]) == [False, True]
    assert satisfied(crm, [accepted]) == [True, False]


def test_a_backup_needs_upload_decrypt_check_and_restore_within_two_hours() -> None:
    backup = rule("backup-restore-proven")

    assert backup.trigger.matches(make_span("backup.run", OK))
    assert backup.within == timedelta(hours=2)
    spans = [make_span("backup.upload", OK), make_span("backup.decrypt_check", OK)]
    assert satisfied(backup, spans) == [True, True, False]
