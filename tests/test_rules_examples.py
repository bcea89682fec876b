"""The shipped example rules load, and each one matches the spans its story describes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from outcomewatch.model import Span, SpanStatus
from outcomewatch.rules import Rule, check_paths, load_rules
from outcomewatch.rules.load import is_rule_test_file

EXAMPLES = Path(__file__).resolve().parent.parent / "rules" / "examples"
EXAMPLE_FILES = sorted(p for p in EXAMPLES.glob("*.yaml") if not is_rule_test_file(p))

OK, ERROR = SpanStatus.OK, SpanStatus.ERROR


def make_span(
    name: str,
    status: SpanStatus = SpanStatus.UNSET,
    attributes: dict[str, Any] | None = None,
    *,
    duration: timedelta = timedelta(microseconds=1),
) -> Span:
    return Span(
        trace_id="0" * 32,
        span_id="1" * 16,
        parent_span_id="",
        name=name,
        service="svc",
        kind=1,
        start_ns=0,
        end_ns=duration // timedelta(microseconds=1) * 1000,
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


def test_there_is_one_example_file_per_seed_story_then_one_per_rule_feature() -> None:
    assert [p.name for p in EXAMPLE_FILES] == [
        "01-payment-failed-access.yaml",
        "02-report-delivered.yaml",
        "03-model-batch-visible.yaml",
        "04-queue-reconciled.yaml",
        "05-backup-restore-proven.yaml",
        "06-forbid-email-error.yaml",
        "07-correlated-provisioning.yaml",
        "08-charge-exactly-once.yaml",
        "09-nightly-backup-schedule.yaml",
        "10-grouped-by-customer.yaml",
    ]


def test_every_example_file_starts_with_a_comment_telling_its_story() -> None:
    for path in EXAMPLE_FILES:
        assert path.read_text().startswith("# Story: "), path.name


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


def test_a_report_run_fails_on_a_failed_email_send_in_its_trace() -> None:
    report = rule("report-delivered-without-send-errors")

    assert report.trigger.matches(
        make_span("report.generate", OK, {"report.delivery": "email"})
    )
    (forbidden,) = report.forbid
    assert forbidden.matches(make_span("email.send", ERROR))
    assert not forbidden.matches(make_span("email.send", OK))


def test_provisioning_is_correlated_by_subscription_id_and_bounded_by_within() -> None:
    provisioning = rule("subscription-provisioned")

    assert provisioning.correlate == ("subscription.id",)
    assert provisioning.within == timedelta(minutes=10)
    assert satisfied(
        provisioning, [make_span("provisioning.job", OK), make_span("tenant.ready", OK)]
    ) == [True, True]


def test_a_charge_counts_once_after_the_trigger_and_only_if_under_ten_seconds() -> None:
    checkout = rule("checkout-charged-exactly-once")
    charge = checkout.expect[0]

    assert charge.count is not None
    assert [charge.count.admits(n) for n in (0, 1, 2)] == [False, True, False]
    assert charge.after_trigger
    assert charge.matches(make_span("payment.charge", OK, duration=timedelta(seconds=9)))
    assert not charge.matches(make_span("payment.charge", OK, duration=timedelta(seconds=10)))
    assert checkout.max_duration == timedelta(minutes=5)


def test_the_nightly_backup_is_due_at_three_in_helsinki_with_half_an_hour_of_grace() -> None:
    backup = rule("nightly-backup-ran")

    assert backup.schedule is not None
    assert (backup.schedule.cron, backup.schedule.tz) == ("0 3 * * *", "Europe/Helsinki")
    assert backup.schedule.grace == timedelta(minutes=30)
    assert backup.within == timedelta(hours=2)
    assert backup.trigger.matches(make_span("backup.run", OK, {"backup.kind": "nightly"}))


def test_export_incidents_are_grouped_by_customer() -> None:
    assert rule("customer-export-delivered").group_by == ("customer.id",)
