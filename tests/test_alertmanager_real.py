"""Incidents announced to a real Alertmanager (Debian's ``prometheus-alertmanager``, started by
the test): the whole server with its DuckDB file, spans from the official OTLP exporter, and the
server's clock moved by the test. What Alertmanager holds is read from its v2 API, what it
delivers from a webhook receiver of the test's own.

The server's clock starts two minutes behind the real one: Alertmanager judges ``endsAt`` by
its own (real) clock, so a resolve stamped by the server must not lie in Alertmanager's future,
while a firing alert's ``endsAt`` (server time + 4 x resend_every) still does."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from outcomewatch.clock import ManualClock
from outcomewatch.incidents.senders import fingerprint
from tests.alertmanager import Alertmanager, running_alertmanager
from tests.harness import RunningServer, running_server, trace_id_of
from tests.processes import wait_for
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
    group_by: customer.id
  - name: refund-recorded
    description: Every refund is written to the ledger.
    owner: finance
    route: finance-hooks
    trigger: {span: refund.issued}
    expect: [{span: ledger.written}]
"""


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class Shop:
    server: RunningServer

    def fail(self, span: str = "order.placed", customer: str = "c-1") -> None:
        tracer = self.server.tracer("grpc", **{"service.name": "shop"})
        with tracer.start_as_current_span(span, attributes={"customer.id": customer}) as root:
            pass
        self.server.go_idle()
        rule = "order-confirmed" if span == "order.placed" else "refund-recorded"
        self.server.verdict(trace_id_of(root), rule)

    def incident(self, rule: str = "order-confirmed") -> dict[str, Any]:
        incidents = self.server.get("/api/v1/incidents", rule=rule)["incidents"]
        assert len(incidents) == 1
        incident: dict[str, Any] = incidents[0]
        return incident

    def act(self, incident_id: int, action: str) -> None:
        assert self.server.api.post(f"/api/v1/incidents/{incident_id}/{action}").is_success


@contextmanager
def shop(tmp_path: Path, routes: str) -> Iterator[Shop]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = tmp_path / "outcomewatch.yaml"
    config.write_text("external_url: http://outcomewatch.test\nroutes:\n" + routes)
    clock = ManualClock(datetime.now(UTC) - timedelta(minutes=2))
    with running_server(tmp_path, rules=[rules], config=config, clock=clock) as server:
        yield Shop(server)


def am_route(am: Alertmanager) -> str:
    return f"  shop-oncall:\n    alertmanager: {{url: '{am.url}', resend_every: 1m}}\n"


def test_an_alert_arrives_with_its_labels_and_annotations_and_the_resolve_ends_it(tmp_path):
    with running_alertmanager(tmp_path / "am") as am, shop(tmp_path, am_route(am)) as world:
        world.fail(customer="c-42")
        (alert,) = wait_for(am.alerts, what="the alert in Alertmanager")
        incident = world.incident()
        labels = {"alertname": "OutcomeMissing", "rule": "order-confirmed", "owner": "shop",
                  "severity": "critical", "route": "shop-oncall", "customer_id": "c-42"}
        assert alert["labels"] == labels
        assert alert["annotations"]["description"] == (
            "Every online order gets its confirmation email.")
        assert alert["annotations"]["summary"] == incident["summary"]
        assert alert["annotations"]["incident_url"] == (
            f"http://outcomewatch.test/api/v1/incidents/{incident['id']}")
        assert alert["fingerprint"] == fingerprint(labels)  # computed as Alertmanager does
        # The snapshot carries milliseconds, the API microseconds.
        assert abs(instant(alert["startsAt"]) - instant(incident["opened_at"])) < timedelta(
            milliseconds=1)

        # What Alertmanager delivers to its own receivers: the same alert, firing.
        (message,) = wait_for(lambda: list(am.delivered), what="Alertmanager's notification")
        assert message["status"] == "firing"
        assert message["alerts"][0]["labels"] == labels
        assert message["alerts"][0]["fingerprint"] == fingerprint(labels)

        world.act(incident["id"], "resolve")
        wait_for(lambda: not am.alerts(), what="the resolve to end the alert")
        resolved = wait_for(
            lambda: [m for m in am.delivered if m["status"] == "resolved"],
            what="Alertmanager's resolved notification")
        assert resolved[0]["alerts"][0]["labels"] == labels


def test_after_an_alertmanager_restart_the_firing_alert_is_back_within_resend_every(tmp_path):
    with running_alertmanager(tmp_path / "am") as am, shop(tmp_path, am_route(am)) as world:
        world.fail()
        wait_for(am.alerts, what="the alert")
        am.stop()
        am.start()  # a new storage dir: it remembers nothing
        assert am.alerts() == []
        world.server.advance(timedelta(minutes=1))
        (alert,) = wait_for(am.alerts, what="the re-sent alert")
        assert alert["labels"]["rule"] == "order-confirmed"


def test_a_reopened_incident_starts_at_its_reopening_in_the_post_and_the_resends(tmp_path):
    with running_alertmanager(tmp_path / "am") as am, shop(tmp_path, am_route(am)) as world:
        world.fail()
        (first,) = wait_for(am.alerts, what="the first alert")
        incident = world.incident()
        world.act(incident["id"], "resolve")
        wait_for(lambda: not am.alerts(), what="the resolve")

        world.fail()  # within the reopen window: the same incident, open again
        reopened_at = world.server.clock()
        detail = world.server.get(f"/api/v1/incidents/{incident['id']}")
        assert detail["status"] == "open"
        kinds = [event["kind"] for event in detail["timeline"]]
        assert kinds[-1] == "reopened"
        (again,) = wait_for(am.alerts, what="the re-opened alert")
        starts = instant(again["startsAt"])
        assert starts > instant(first["startsAt"])
        assert abs(starts - reopened_at) < timedelta(seconds=1)  # stamped by the server's clock

        world.server.advance(timedelta(minutes=1))  # a re-send
        wait_for(lambda: [a for a in am.alerts() if a["endsAt"] != again["endsAt"]],
                   what="the re-sent alert")
        (resent,) = am.alerts()
        assert instant(resent["startsAt"]) == starts


class BlackHole:
    """A TCP listener that accepts connections and never answers (a hung receiver)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


def test_a_black_hole_on_one_route_does_not_hold_up_a_webhook_on_another(tmp_path):
    received: list[Any] = []

    async def hook(request: Request) -> JSONResponse:
        received.append(await request.json())
        return JSONResponse({})

    hole = BlackHole()
    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    try:
        with running_asgi(app) as hook_url:
            routes = (f"  shop-oncall:\n    alertmanager: {{url: '{hole.url}', timeout: 1h}}\n"
                      f"  finance-hooks:\n    webhook: {{url: '{hook_url}/hook'}}\n")
            with shop(tmp_path, routes) as world:
                for customer in ("c-1", "c-2", "c-3"):
                    world.fail(customer=customer)
                assert hole.accepted.wait(15)
                world.fail("refund.issued")
                (message,) = wait_for(lambda: list(received), what="the webhook")
                assert message["commonLabels"]["rule"] == "refund-recorded"
                # Delivered while every post to the black hole is still waiting for an answer.
                pending = world.server.get("/api/v1/notifications", status="pending")
                stuck = [n for n in pending["notifications"] if n["route"] == "shop-oncall"]
                assert len(stuck) == 3 and all(n["attempts"] == 0 for n in stuck)
    finally:
        hole.close()
