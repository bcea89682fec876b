"""The rule language end to end: the shipped example rules (06-10), real spans from the
official OTel SDK exporter, a real server, verdicts read through the API. Time is injected."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.trace import Link, Span, Status, StatusCode, Tracer

from outcomewatch.clock import ManualClock, to_ns
from tests.harness import RunningServer, running_server, trace_id_of


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path) as running:
        yield running


def child(tracer: Tracer, parent: Span, name: str, *, ok: bool = True, start: int | None = None,
          end: int | None = None, **attributes: Any) -> Span:
    span = tracer.start_span(name, context=otel_trace.set_span_in_context(parent),
                             attributes=attributes, start_time=start)
    span.set_status(Status(StatusCode.OK if ok else StatusCode.ERROR,
                           None if ok else f"{name} failed"))
    span.end(end_time=end)
    return span


def failure_of(server: RunningServer, rule: str) -> dict[str, Any]:
    (incident,) = server.wait_for(
        lambda: server.get("/api/v1/incidents", rule=rule)["incidents"], what=f"{rule} incident")
    detail: dict[str, Any] = server.get(f"/api/v1/incidents/{incident['id']}")
    return detail


def test_a_forbidden_error_span_fails_the_run_before_the_trace_goes_idle(server):
    tracer = server.tracer("grpc", **{"service.name": "reports"})
    report = tracer.start_span("report.generate", attributes={
        "report.delivery": "email", "report.id": "rep-9"})
    child(tracer, report, "email.send", ok=False, provider="smtp-eu")
    report.set_status(Status(StatusCode.OK))
    report.end()

    # No clock movement at all: the forbidden span alone decides.
    run = server.verdict(trace_id_of(report), "report-delivered-without-send-errors")
    assert (run["status"], run["reason"], run["missing"]) == (
        "failed", "forbidden", ["email.delivered"])
    (offending,) = failure_of(server, run["rule"])["failures"][0]["offending"]
    assert (offending["name"], offending["status_message"]) == ("email.send", "email.send failed")


def test_outcomes_in_another_trace_linked_to_the_trigger_satisfy_a_correlated_rule(server):
    tracer = server.tracer("http", **{"service.name": "billing"})
    webhook = tracer.start_span("billing.webhook", attributes={
        "event.type": "customer.subscription.created", "subscription.id": "sub_9"})
    webhook.end()
    worker = server.tracer("grpc", **{"service.name": "provisioner"})
    # The job runs later in its own trace; it links back to the webhook span (no shared ids).
    job = worker.start_span("provisioning.job", links=[Link(webhook.get_span_context())])
    child(worker, job, "tenant.ready")
    job.set_status(Status(StatusCode.OK))
    job.end()
    assert trace_id_of(job) != trace_id_of(webhook)

    run = server.verdict(trace_id_of(webhook), "subscription-provisioned")
    assert (run["status"], run["missing"]) == ("passed", [])


def test_outcomes_in_another_trace_with_the_same_key_satisfy_a_correlated_rule(server):
    tracer = server.tracer("grpc", **{"service.name": "billing"})
    worker = server.tracer("grpc", **{"service.name": "provisioner"})
    child_job = worker.start_span("provisioning.job", attributes={"subscription.id": "sub_7"})
    child_job.set_status(Status(StatusCode.OK))
    child_job.end()  # arrives before the trigger: held, then counted
    webhook = tracer.start_span("billing.webhook", attributes={
        "event.type": "customer.subscription.created", "subscription.id": "sub_7"})
    webhook.end()
    server.advance(timedelta(minutes=10, seconds=1))

    run = server.verdict(trace_id_of(webhook), "subscription-provisioned")
    assert (run["status"], run["reason"], run["missing"]) == (
        "failed", "deadline", ["tenant.ready"])


def checkout(tracer: Tracer, *, charges: int, charge_ms: int = 300,
             receipt_after: timedelta = timedelta(seconds=1)) -> str:
    start = to_ns(datetime.now(UTC))
    submit = tracer.start_span("checkout.submit", start_time=start, attributes={"order.id": "o1"})
    for i in range(charges):
        at = start + (i + 1) * 1_000_000
        child(tracer, submit, "payment.charge", start=at, end=at + charge_ms * 1_000_000)
    receipt = start + int(receipt_after.total_seconds() * 1e9)
    child(tracer, submit, "receipt.sent", start=receipt, end=receipt + 1_000_000)
    submit.set_status(Status(StatusCode.OK))
    submit.end(end_time=receipt + 2_000_000)
    return trace_id_of(submit)


def test_exactly_once_passes_with_one_charge_once_the_wait_is_over(server):
    trace_id = checkout(server.tracer("grpc", **{"service.name": "shop"}), charges=1)
    server.advance(timedelta(minutes=15, seconds=1))
    run = server.verdict(trace_id, "checkout-charged-exactly-once")
    assert (run["status"], run["missing"]) == ("passed", [])


def test_a_second_charge_fails_an_exactly_once_rule_at_once(server):
    trace_id = checkout(server.tracer("grpc", **{"service.name": "shop"}), charges=2)
    run = server.verdict(trace_id, "checkout-charged-exactly-once")
    assert (run["status"], run["reason"]) == ("failed", "count")


def test_a_charge_slower_than_its_duration_bound_does_not_count(server):
    trace_id = checkout(server.tracer("grpc", **{"service.name": "shop"}), charges=1,
                        charge_ms=12_000, receipt_after=timedelta(seconds=13))
    server.advance(timedelta(minutes=15, seconds=1))
    run = server.verdict(trace_id, "checkout-charged-exactly-once")
    assert (run["status"], run["missing"]) == ("failed", ["payment.charge"])


def test_outcomes_later_than_max_duration_fail_the_run(server):
    trace_id = checkout(server.tracer("grpc", **{"service.name": "shop"}), charges=1,
                        receipt_after=timedelta(minutes=6))
    server.advance(timedelta(minutes=15, seconds=1))
    run = server.verdict(trace_id, "checkout-charged-exactly-once")
    assert (run["status"], run["reason"]) == ("failed", "max_duration")


def test_group_by_opens_one_incident_per_customer(server):
    tracer = server.tracer("grpc", **{"service.name": "exports"})
    for customer in ("cus_a", "cus_b", "cus_a"):
        tracer.start_span("export.request", attributes={"customer.id": customer}).end()
    server.advance(timedelta(hours=1, seconds=1))

    def all_three_failures() -> list[dict[str, Any]]:
        found = server.get("/api/v1/incidents", rule="customer-export-delivered")["incidents"]
        return found if sum(i["failure_count"] for i in found) == 3 else []

    incidents = server.wait_for(all_three_failures, what="three failures")
    assert sorted((i["group"]["customer.id"], i["failure_count"]) for i in incidents) == [
        ("cus_a", 2), ("cus_b", 1)]


NIGHT = datetime(2026, 11, 24, 0, 45, tzinfo=UTC)  # 02:45 in Helsinki; the slot is 03:00 there


def test_a_missed_nightly_slot_fails_once_and_a_restart_does_not_count_it_again(tmp_path):
    clock = ManualClock(NIGHT)
    with running_server(tmp_path, clock=clock) as server:
        server.advance(timedelta(minutes=46))  # 03:31 Helsinki: past the 30m grace
        missed = server.wait_for(lambda: server.runs(rule="nightly-backup-ran"), what="missed")
        assert [(r["status"], r["reason"]) for r in missed] == [("failed", "missed")]
        failure = failure_of(server, "nightly-backup-ran")["failures"][0]
        assert failure["scheduled_at"].startswith("2026-11-24T01:00:00")
    with running_server(tmp_path, clock=clock) as again:
        again.advance(timedelta(minutes=5))
        # A healthy night: the next slot's backup starts on time (01:00Z is 03:00 Helsinki).
        tracer = again.tracer("grpc", **{"service.name": "backup"})
        slot = to_ns(datetime(2026, 11, 25, 1, 2, tzinfo=UTC))
        run = tracer.start_span("backup.run", start_time=slot,
                                attributes={"backup.kind": "nightly"})
        child(tracer, run, "backup.upload", start=slot + 1, end=slot + 2)
        child(tracer, run, "backup.verify", start=slot + 3, end=slot + 4)
        run.end(end_time=slot + 5)
        again.advance(timedelta(days=1))
        passed = again.verdict(trace_id_of(run), "nightly-backup-ran")
        assert passed["status"] == "passed"
        runs = again.runs(rule="nightly-backup-ran")
        assert sorted((r["status"], r["reason"]) for r in runs) == [
            ("failed", "missed"), ("passed", None)]


def test_a_charge_that_started_before_the_checkout_does_not_count_after_trigger(server):
    tracer = server.tracer("grpc", **{"service.name": "shop"})
    start = to_ns(datetime.now(UTC))
    submit = tracer.start_span("checkout.submit", start_time=start)
    child(tracer, submit, "payment.charge", start=start - 5_000_000, end=start + 1_000_000)
    child(tracer, submit, "receipt.sent", start=start + 2_000_000, end=start + 3_000_000)
    submit.set_status(Status(StatusCode.OK))
    submit.end(end_time=start + 4_000_000)
    server.advance(timedelta(minutes=15, seconds=1))

    run = server.verdict(trace_id_of(submit), "checkout-charged-exactly-once")
    assert (run["status"], run["missing"]) == ("failed", ["payment.charge"])


def test_over_max_live_traces_the_oldest_are_judged_early_and_counted(tmp_path: Path) -> None:
    with running_server(tmp_path, max_live_traces=2) as server:
        tracer = server.tracer("grpc", **{"service.name": "billing"})
        traces = []
        for _ in range(3):
            with tracer.start_as_current_span("stripe.webhook", attributes={
                    "event.type": "invoice.payment_failed"}) as webhook:
                pass
            traces.append(trace_id_of(webhook))

        run = server.verdict(traces[0], "payment-failed-updates-access")
        assert (run["status"], run["reason"]) == ("failed", "evicted")
        assert [r["status"] for r in server.runs(trace_id=traces[2])] == ["open"]
        server.wait_for(lambda: "outcomewatch_evicted_traces_total 1.0" in server.api.get(
            "/metrics").text.splitlines(), what="the eviction counted")
