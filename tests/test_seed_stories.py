"""The five quiet failures users judge us by (shared/seeds), each healthy and broken, end to end:
the official OTel SDK exporters send real spans to a real server, and the verdicts and
incidents are read back through the HTTP API. The example rules in rules/examples are used as
shipped."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from opentelemetry.trace import Status, StatusCode, Tracer

from tests.harness import RunningServer, trace_id_of

DEPLOY = {"service.version": "2026.11.3-9f1c2ab", "host.name": "worker-7"}


def ok(tracer: Tracer, name: str, **attributes: Any) -> None:
    with tracer.start_as_current_span(name, attributes=attributes) as span:
        span.set_status(Status(StatusCode.OK))


def error(tracer: Tracer, name: str, message: str, **attributes: Any) -> None:
    with tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        span.record_exception(RuntimeError(message))
        span.set_status(Status(StatusCode.ERROR, message))


def incident_of(server: RunningServer, run: dict[str, Any]) -> dict[str, Any]:
    incidents = server.get("/api/v1/incidents", rule=run["rule"])["incidents"]
    assert len(incidents) == 1
    detail: dict[str, Any] = server.get(f"/api/v1/incidents/{incidents[0]['id']}")
    return detail


# -- 01: Stripe accepted the webhook, but access never changed ------------------------------


def payment_failed(tracer: Tracer, *, entitlement_job_runs: bool) -> str:
    with tracer.start_as_current_span("stripe.webhook", attributes={
        "event.type": "invoice.payment_failed", "subscription.id": "sub_1Q2w",
        "customer.id": "cus_9Z", "http.response.status_code": 200,
    }) as webhook:
        ok(tracer, "subscription.local_state.update")
        if entitlement_job_runs:
            ok(tracer, "entitlement.updated", plan="past_due")
            ok(tracer, "email.delivered", **{"email.template": "dunning"})
    return trace_id_of(webhook)


def test_a_failed_invoice_that_changes_access_and_emails_the_customer_passes(server):
    tracer = server.tracer("grpc", **{"service.name": "billing", **DEPLOY})
    trace_id = payment_failed(tracer, entitlement_job_runs=True)

    run = server.verdict(trace_id, "payment-failed-updates-access")
    assert (run["status"], run["missing"]) == ("passed", [])
    assert server.get("/api/v1/incidents")["incidents"] == []


def test_a_webhook_answered_200_without_the_entitlement_change_opens_an_incident(server):
    tracer = server.tracer("grpc", **{"service.name": "billing", **DEPLOY})
    trace_id = payment_failed(tracer, entitlement_job_runs=False)
    server.advance(timedelta(minutes=10, seconds=1))

    run = server.verdict(trace_id, "payment-failed-updates-access")
    assert run["status"] == "failed"
    assert run["reason"] == "deadline"
    assert run["missing"] == ["entitlement.updated", "email.delivered"]
    incident = incident_of(server, run)
    assert (incident["owner"], incident["route"], incident["severity"]) == (
        "billing", "billing-oncall", "critical")
    failure = incident["failures"][0]
    assert failure["trace_id"] == trace_id
    assert failure["evidence"] == {"subscription.id": "sub_1Q2w", "customer.id": "cus_9Z"}
    assert failure["resource"]["service.version"] == DEPLOY["service.version"]
    assert failure["resource"]["host.name"] == DEPLOY["host.name"]
    assert failure["trigger"]["attributes"]["event.type"] == "invoice.payment_failed"


# -- 02: The report rendered, but the email never sent ---------------------------------------


def scheduled_report(tracer: Tracer, *, delivered: bool) -> str:
    with tracer.start_as_current_span("report.generate", attributes={
        "report.schedule": "daily-08:00", "report.id": "rep_42", "customer.id": "cus_7",
    }) as report:
        ok(tracer, "report.query", rows=1200)
        ok(tracer, "report.render")
        if delivered:
            ok(tracer, "email.delivered", provider="postmark")
        else:
            error(tracer, "email.send", "550 5.1.1 mailbox unavailable", provider="postmark")
    return trace_id_of(report)


def test_a_report_whose_delivery_receipt_arrives_passes(server):
    tracer = server.tracer("http", **{"service.name": "reports", **DEPLOY})
    trace_id = scheduled_report(tracer, delivered=True)

    run = server.verdict(trace_id, "scheduled-report-delivered")
    assert (run["status"], run["missing"]) == ("passed", [])


def test_a_report_whose_email_provider_refused_fails_with_the_provider_response(server):
    tracer = server.tracer("http", **{"service.name": "reports", **DEPLOY})
    trace_id = scheduled_report(tracer, delivered=False)
    server.advance(timedelta(minutes=31))

    run = server.verdict(trace_id, "scheduled-report-delivered")
    assert (run["status"], run["missing"]) == ("failed", ["email.delivered"])
    failure = incident_of(server, run)["failures"][0]
    (email_send,) = failure["error_spans"]
    assert email_send["name"] == "email.send"
    assert email_send["service"] == "reports"
    assert email_send["status_message"] == "550 5.1.1 mailbox unavailable"
    assert email_send["exceptions"][0]["message"] == "550 5.1.1 mailbox unavailable"
    assert failure["evidence"] == {"report.id": "rep_42", "customer.id": "cus_7"}


# -- 03: The model batch finished, but output never appeared ---------------------------------


def model_batch(tracer: Tracer, *, persisted: bool) -> str:
    with tracer.start_as_current_span(
        "batch.process", attributes={"batch.size": 32, "batch.id": "b-2026-11-24-03"}
    ) as batch:
        ok(tracer, "model.call", model="classifier-v4")
        if persisted:
            ok(tracer, "result.validated")
            ok(tracer, "result.persisted")
            ok(tracer, "result.published")
        else:
            error(tracer, "result.validated", "schema mismatch: field 'score' is null")
    return trace_id_of(batch)


def test_a_batch_whose_results_are_validated_persisted_and_published_passes(server):
    tracer = server.tracer("grpc", **{"service.name": "inference", **DEPLOY})
    trace_id = model_batch(tracer, persisted=True)

    run = server.verdict(trace_id, "model-batch-results-visible")
    assert (run["status"], run["missing"]) == ("passed", [])


def test_a_batch_whose_validation_failed_after_the_model_call_opens_an_incident(server):
    tracer = server.tracer("grpc", **{"service.name": "inference", **DEPLOY})
    trace_id = model_batch(tracer, persisted=False)
    server.advance(timedelta(minutes=31))

    run = server.verdict(trace_id, "model-batch-results-visible")
    assert run["status"] == "failed"
    assert run["missing"] == ["result.validated", "result.persisted", "result.published"]
    failure = incident_of(server, run)["failures"][0]
    assert [s["name"] for s in failure["error_spans"]] == ["result.validated"]
    assert "model.call" in [s["name"] for s in failure["green_signals"]]
    assert failure["evidence"] == {"batch.id": "b-2026-11-24-03"}
    assert failure["duration_ms"] >= 0


# -- 04: The queue drained, but the external update failed -----------------------------------


REJECTED = "422: property 'lifecyclestage' invalid"


def crm_task(tracer: Tracer, *, accepted: bool) -> str:
    with tracer.start_as_current_span("queue.consume", attributes={
        "task.type": "crm.contact_update", "task.id": "task-881", "external.id": "hs-contact-5521",
    }) as task:
        if accepted:
            ok(tracer, "external.update", **{"http.response.status_code": 200})
            ok(tracer, "state.reconciled")
        else:
            with tracer.start_as_current_span(
                "external.update", attributes={"http.response.status_code": 422}
            ) as update:
                update.set_status(Status(StatusCode.ERROR, REJECTED))
    return trace_id_of(task)


def test_a_task_reconciled_after_the_external_api_accepted_it_passes(server):
    tracer = server.tracer("http", **{"service.name": "crm-sync", **DEPLOY})
    trace_id = crm_task(tracer, accepted=True)

    run = server.verdict(trace_id, "crm-sync-reconciled")
    assert (run["status"], run["missing"]) == ("passed", [])


def test_a_dequeued_task_the_external_api_rejected_fails_with_what_can_be_retried(server):
    tracer = server.tracer("http", **{"service.name": "crm-sync", **DEPLOY})
    trace_id = crm_task(tracer, accepted=False)
    server.advance(timedelta(minutes=16))

    run = server.verdict(trace_id, "crm-sync-reconciled")
    assert (run["status"], run["missing"]) == ("failed", ["external.update", "state.reconciled"])
    failure = incident_of(server, run)["failures"][0]
    assert failure["evidence"] == {"task.id": "task-881", "external.id": "hs-contact-5521"}
    assert failure["error_spans"][0]["status_message"] == REJECTED
    assert failure["resource"]["service.version"] == DEPLOY["service.version"]
    assert failure["resource"]["host.name"] == "worker-7"


# -- 05: The backup existed, but restore proof was missing -----------------------------------


def backup_drill(tracer: Tracer, *, restored: bool) -> str:
    with tracer.start_as_current_span("backup.run", attributes={"backup.id": "bk-0311"}) as run:
        ok(tracer, "backup.dump")
        ok(tracer, "backup.upload", bucket="backups-eu")
        if restored:
            ok(tracer, "backup.decrypt_check")
            ok(tracer, "restore.verify", tables=214)
    return trace_id_of(run)


def test_a_backup_with_a_verified_restore_passes(server):
    tracer = server.tracer("grpc", **{"service.name": "backup", **DEPLOY})
    trace_id = backup_drill(tracer, restored=True)

    run = server.verdict(trace_id, "backup-restore-proven")
    assert (run["status"], run["missing"]) == ("passed", [])


def test_a_backup_that_was_uploaded_but_never_restored_fails_after_its_window(server):
    tracer = server.tracer("grpc", **{"service.name": "backup", **DEPLOY})
    trace_id = backup_drill(tracer, restored=False)
    server.advance(timedelta(hours=1))
    server.go_idle()
    (still_open,) = server.wait_for(lambda: server.runs(trace_id=trace_id), what="the run")
    assert still_open["status"] == "open"  # idle is not the deadline
    server.advance(timedelta(hours=1))

    run = server.verdict(trace_id, "backup-restore-proven")
    assert (run["status"], run["reason"]) == ("failed", "deadline")
    assert run["missing"] == ["backup.decrypt_check", "restore.verify"]
    incident = incident_of(server, run)
    assert incident["severity"] == "critical"
    assert incident["failure_count"] == 1
