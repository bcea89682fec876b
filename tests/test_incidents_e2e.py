"""Incidents people can act on, end to end: real spans from the official exporter, a real
server and DuckDB file, and real local HTTP servers standing in for Alertmanager and a webhook
receiver (real sockets, no mocked client). Time moves by the injected clock."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from opentelemetry import trace as otel_trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.harness import RunningServer, running_server, trace_id_of
from tests.servers import running_asgi

RULES = """
rules:
  - name: order-confirmed
    description: Every online order gets its confirmation email.
    owner: shop
    route: shop-oncall
    severity: critical
    trigger: {span: order.placed}
    expect: [{span: email.sent}]
    evidence: [order.id]
    open_after: {open_after}
    resolve_after: 2
"""


@dataclass
class Receiver:
    """A stand-in for Alertmanager or a webhook endpoint: records what it accepts, and answers
    500 to the first ``fail_first`` requests."""

    fail_first: int = 0
    received: list[Any] = field(default_factory=list)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def accept(request: Request) -> JSONResponse:
            body = await request.json()
            with self.lock:
                if self.refused < self.fail_first:
                    self.refused += 1
                    return JSONResponse({"error": "temporarily broken"}, status_code=500)
                self.received.append(body)
            return JSONResponse({"status": "success"})

        return Starlette(routes=[Route("/api/v2/alerts", accept, methods=["POST"]),
                                 Route("/hook", accept, methods=["POST"])])


@dataclass
class World:
    server: RunningServer
    alertmanager: Receiver
    webhook: Receiver

    def order(self, *, emailed: bool, order_id: str = "ord-1") -> str:
        tracer = self.server.tracer("grpc", **{"service.name": "shop",
                                              "service.version": "2026.11.24"})
        with tracer.start_as_current_span("order.placed", attributes={"order.id": order_id}) as o:
            if emailed:
                tracer.start_span("email.sent").end()
        return trace_id_of(o)

    def failed_order(self) -> dict[str, Any]:
        trace_id = self.order(emailed=False)
        self.server.go_idle()
        return self.server.verdict(trace_id, "order-confirmed")

    def passed_order(self) -> dict[str, Any]:
        return self.server.verdict(self.order(emailed=True), "order-confirmed")

    def incidents(self) -> list[dict[str, Any]]:
        incidents: list[dict[str, Any]] = self.server.get("/api/v1/incidents")["incidents"]
        return incidents

    def webhook_statuses(self, count: int) -> list[tuple[str, str]]:
        self.server.wait_for(lambda: len(self.webhook.received) >= count,
                             what=f"{count} webhook deliveries")
        return [(b["status"], b["outcomewatch"]["transition"]) for b in self.webhook.received]


@contextmanager
def world(tmp_path: Path, *, open_after: int = 1, fail_first: int = 0,
          api_token: str | None = None, resend: str = "1m") -> Iterator[World]:
    alertmanager, webhook = Receiver(), Receiver(fail_first=fail_first)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("{open_after}", str(open_after)))
    with running_asgi(alertmanager.app()) as am_url, running_asgi(webhook.app()) as hook_url:
        config = tmp_path / "outcomewatch.yaml"
        config.write_text(
            "external_url: http://outcomewatch.test\n"
            "routes:\n"
            "  shop-oncall:\n"
            f"    alertmanager: {{url: '{am_url}', resend_every: {resend}}}\n"
            f"    webhook: {{url: '{hook_url}/hook', headers: {{X-Team: shop}}}}\n"
        )
        with running_server(tmp_path, rules=[rules], config=config,
                            api_token=api_token) as server:
            yield World(server, alertmanager, webhook)


def test_open_resolve_and_reopen_notifications_arrive_once_each_in_order(tmp_path):
    with world(tmp_path) as w:
        w.failed_order()
        assert w.webhook_statuses(1) == [("firing", "opened")]
        w.passed_order()
        w.passed_order()  # resolve_after: 2
        assert w.webhook_statuses(2)[1] == ("resolved", "resolved")
        w.failed_order()  # within reopen_window (24h): the same incident re-opens
        assert w.webhook_statuses(3) == [
            ("firing", "opened"), ("resolved", "resolved"), ("firing", "reopened")]

        (incident,) = w.incidents()
        assert (incident["status"], incident["failure_count"]) == ("open", 2)
        w.server.wait_for(lambda: len(w.alertmanager.received) >= 3, what="3 alerts")
        alerts = [body[0] for body in w.alertmanager.received]
        assert [a["labels"]["rule"] for a in alerts] == ["order-confirmed"] * 3
        assert alerts[0]["labels"]["severity"] == "critical"
        # Firing alerts end 4 x resend_every (1m) after they are posted, unless posted again;
        # the resolve sets endsAt to the moment of resolution.
        ends = [datetime.fromisoformat(a["endsAt"].replace("Z", "+00:00")) for a in alerts]
        starts = [datetime.fromisoformat(a["startsAt"].replace("Z", "+00:00")) for a in alerts]
        assert ends[0] - starts[0] == timedelta(minutes=4)
        assert ends[1] < ends[0]
        assert ends[2] > ends[1]
        assert alerts[0]["annotations"]["incident_url"].endswith(
            f"/api/v1/incidents/{incident['id']}")
        kinds = [e["kind"] for e in w.server.get(
            f"/api/v1/incidents/{incident['id']}")["timeline"]]
        assert kinds == ["opened", "resolved", "reopened"]


def test_a_receiver_that_fails_three_times_then_recovers_gets_each_notification_once(tmp_path):
    with world(tmp_path, fail_first=3) as w:
        w.failed_order()
        for attempt in range(1, 4):
            # Wait until the refusal is recorded (with its backoff counted from the current
            # clock) before moving the clock past that backoff.
            def refused(a: int = attempt) -> list[dict[str, Any]]:
                return [n for n in w.server.get("/api/v1/notifications", status="failed")[
                    "notifications"] if n["attempts"] == a]

            failed = w.server.wait_for(refused, what=f"attempt {attempt}")
            assert [n["target"] for n in failed] == ["webhook"]
            w.server.advance(timedelta(minutes=5))  # past any backoff
        assert w.webhook_statuses(1) == [("firing", "opened")]
        sent = w.server.wait_for(lambda: [
            n for n in w.server.get("/api/v1/notifications", status="sent")["notifications"]
            if n["target"] == "webhook"] and w.server.get(
                "/api/v1/notifications", status="sent")["notifications"], what="both sent")
        assert sorted(n["target"] for n in sent) == ["alertmanager", "webhook"]
        assert [n["attempts"] for n in sent if n["target"] == "webhook"] == [4]
        assert len(w.webhook.received) == 1


def test_flap_control_opens_the_incident_only_after_open_after_consecutive_failures(tmp_path):
    with world(tmp_path, open_after=3) as w:
        w.failed_order()
        w.failed_order()
        w.passed_order()  # breaks the streak
        w.failed_order()
        w.failed_order()
        assert w.incidents() == []
        w.failed_order()

        (incident,) = w.server.wait_for(w.incidents, what="the incident")
        assert incident["failure_count"] == 3
        detail = w.server.get(f"/api/v1/incidents/{incident['id']}")
        assert len(detail["failures"]) == 3
        assert w.webhook_statuses(1) == [("firing", "opened")]


def test_a_person_acknowledges_and_resolves_with_a_token_and_the_timeline_says_who(tmp_path):
    with world(tmp_path, api_token="s3cret") as w:
        w.failed_order()
        (incident,) = w.server.wait_for(w.incidents, what="the incident")
        url = f"/api/v1/incidents/{incident['id']}"
        anonymous = w.server.api.post(f"{url}/acknowledge", headers={"Authorization": ""})
        assert anonymous.status_code == 401
        acked = w.server.api.post(f"{url}/acknowledge",
                                  json={"comment": "looking", "actor": "dana"})
        assert acked.json()["status"] == "acknowledged"
        assert w.server.api.post(f"{url}/acknowledge").status_code == 409
        resolved = w.server.api.post(f"{url}/resolve", json={"comment": "mail relay fixed"})
        assert resolved.json()["status"] == "resolved"

        timeline = w.server.get(url)["timeline"]
        assert [(e["kind"], e["actor"], e["comment"]) for e in timeline][1:] == [
            ("acknowledged", "dana", "looking"), ("resolved", "api", "mail relay fixed")]
        assert w.webhook_statuses(3) == [
            ("firing", "opened"), ("firing", "acknowledged"), ("resolved", "resolved")]


def test_a_restart_between_the_transition_and_the_send_loses_nothing(tmp_path):
    with world(tmp_path, fail_first=1_000) as down:
        down.failed_order()
        down.server.wait_for(lambda: down.webhook.refused >= 1, what="a refused delivery")
        assert down.webhook.received == []
    # The same database, the receiver healthy now: the stored notification is delivered once.
    with world(tmp_path) as again:
        again.server.advance(timedelta(minutes=10))
        assert again.webhook_statuses(1) == [("firing", "opened")]
        again.server.wait_for(lambda: again.server.get(
            "/api/v1/notifications", status="sent")["notifications"], what="the sent row")
        assert len(again.webhook.received) == 1


def test_an_outcome_that_arrives_after_the_verdict_is_recorded_not_erased(tmp_path):
    with world(tmp_path) as w:
        tracer = w.server.tracer("grpc", **{"service.name": "shop"})
        with tracer.start_as_current_span("order.placed") as order:
            pass
        trace_id = trace_id_of(order)
        w.server.go_idle()
        assert w.server.verdict(trace_id, "order-confirmed")["status"] == "failed"
        w.server.advance(timedelta(seconds=1))
        with otel_trace.use_span(order, end_on_exit=False):
            tracer.start_span("email.sent").end()

        run = w.server.wait_for(
            lambda: [r for r in w.server.runs(trace_id=trace_id) if r["late_outcomes"]],
            what="the late outcome")[0]
        assert (run["status"], run["late_outcomes"]) == ("failed", ["email.sent"])
        (incident,) = w.incidents()
        kinds = [e["kind"] for e in w.server.get(
            f"/api/v1/incidents/{incident['id']}")["timeline"]]
        assert kinds == ["opened", "late_outcome"]


def test_metrics_count_spans_runs_incidents_and_notifications(tmp_path):
    with world(tmp_path) as w:
        w.passed_order()
        w.failed_order()
        w.webhook_statuses(1)

        def scraped_after_delivery() -> str:
            response = w.server.api.get("/metrics")
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            return response.text if 'result="sent"' in response.text else ""

        text = w.server.wait_for(scraped_after_delivery, what="metrics after a delivery")
        lines = set(text.splitlines())
        assert 'outcomewatch_runs_total{rule="order-confirmed",status="passed"} 1.0' in lines
        assert 'outcomewatch_runs_total{rule="order-confirmed",status="failed"} 1.0' in lines
        assert ('outcomewatch_open_incidents{rule="order-confirmed",severity="critical"} 1.0'
                in lines)
        assert any(line.startswith('outcomewatch_spans_received_total{transport="grpc"}')
                   for line in lines)
        assert "outcomewatch_time_to_outcome_seconds_bucket" in text
        assert "outcomewatch_storage_write_seconds_count" in text


def test_firing_alerts_are_posted_again_every_resend_interval_until_resolved(tmp_path):
    with world(tmp_path) as w:
        w.failed_order()
        w.server.wait_for(lambda: len(w.alertmanager.received) == 1, what="the first alert")
        w.server.advance(timedelta(minutes=1))
        w.server.wait_for(lambda: len(w.alertmanager.received) == 2, what="a resend")
        first, again = (body[0] for body in w.alertmanager.received)
        assert again["labels"] == first["labels"]
        assert again["endsAt"] > first["endsAt"]

        (incident,) = w.incidents()
        assert w.server.api.post(f"/api/v1/incidents/{incident['id']}/resolve").is_success
        w.server.wait_for(lambda: len(w.alertmanager.received) == 3, what="the resolve")
        w.server.advance(timedelta(minutes=5))
        w.passed_order()  # a sync point: several notifier passes happen meanwhile
        assert len(w.alertmanager.received) == 3


def test_with_resend_never_a_firing_alert_is_posted_once_with_a_far_end(tmp_path):
    with world(tmp_path, resend="never") as w:
        w.failed_order()
        w.server.wait_for(lambda: w.alertmanager.received, what="the alert")
        w.server.advance(timedelta(minutes=10))
        w.passed_order()
        (alert,) = (body[0] for body in w.alertmanager.received)
        ends = datetime.fromisoformat(alert["endsAt"].replace("Z", "+00:00"))
        starts = datetime.fromisoformat(alert["startsAt"].replace("Z", "+00:00"))
        assert ends - starts > timedelta(days=300)
