"""GET /metrics as a Prometheus user expects it: ``promtool check metrics`` (Debian's
``prometheus`` package) passes on a real server's exposition; opened and decided runs are
separate counters; no ``_created`` series; open incidents drop to 0; reload, build and queue
gauges; and a failing store never turns a scrape into a 500."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from outcomewatch import __version__
from outcomewatch.api import create_app
from outcomewatch.metrics import Metrics
from outcomewatch.store.queries import Reader
from tests.harness import RunningServer, running_server, trace_id_of
from tests.servers import running_asgi
from tests.system import require

RULES = """
rules:
  - name: order-confirmed
    owner: shop
    route: shop-oncall
    severity: critical
    trigger: {span: order.placed}
    expect: [{span: email.sent}]
"""


@contextmanager
def server_with_a_failing_webhook(tmp_path: Path) -> Iterator[RunningServer]:
    async def refuse(request: Request) -> JSONResponse:
        return JSONResponse({"error": "down"}, status_code=503)

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    app = Starlette(routes=[Route("/hook", refuse, methods=["POST"])])
    with running_asgi(app) as hook_url:
        config = tmp_path / "outcomewatch.yaml"
        config.write_text(f"routes:\n  shop-oncall:\n    webhook: {{url: '{hook_url}/hook'}}\n")
        with running_server(tmp_path, rules=[rules], config=config) as server:
            yield server


def order(server: RunningServer, *, emailed: bool) -> None:
    tracer = server.tracer("grpc", **{"service.name": "shop"})
    with tracer.start_as_current_span("order.placed") as root:
        if emailed:
            tracer.start_span("email.sent").end()
    if not emailed:
        server.go_idle()
    server.verdict(trace_id_of(root), "order-confirmed")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def scrape(server: RunningServer) -> str:
    response = server.api.get("/metrics")
    assert response.status_code == 200
    return response.text


def test_promtool_accepts_the_exposition_and_the_conventions_hold(tmp_path: Path) -> None:
    promtool = require("promtool")
    with server_with_a_failing_webhook(tmp_path) as server:
        order(server, emailed=True)
        order(server, emailed=False)
        server.wait_for(lambda: 'result="failed"' in scrape(server), what="a failed delivery")
        server.advance(timedelta(seconds=30))
        text = scrape(server)

        checked = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                                 capture_output=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.strip() == b"" and checked.stderr.strip() == b""

        values = samples(text)
        rule = (("rule", "order-confirmed"),)
        assert values[("outcomewatch_runs_opened_total", rule)] == 2
        decided = {labels: v for (name, labels), v in values.items()
                   if name == "outcomewatch_runs_total"}
        assert decided == {(("rule", "order-confirmed"), ("status", "failed")): 1,
                           (("rule", "order-confirmed"), ("status", "passed")): 1}
        assert not [line for line in text.splitlines() if "_created" in line]
        assert values[("outcomewatch_build_info", (("version", __version__),))] == 1
        assert values[("outcomewatch_rules_last_reload_successful", ())] == 1
        loaded = server.server.loaded_at.timestamp()
        assert values[("outcomewatch_rules_last_reload_success_timestamp_seconds", ())] == loaded
        # The webhook refuses: its one notification waits, and the age grows with the clock.
        assert values[("outcomewatch_notifications_pending", ())] == 1
        assert values[("outcomewatch_notification_queue_oldest_age_seconds", ())] >= 30
        assert values[("outcomewatch_notifications_total",
                       (("result", "failed"), ("target", "webhook")))] >= 1

        incidents = server.get("/api/v1/incidents")["incidents"]
        open_key = ("outcomewatch_open_incidents",
                    (("rule", "order-confirmed"), ("severity", "critical")))
        assert values[open_key] == 1
        resolved = server.api.post(f"/api/v1/incidents/{incidents[0]['id']}/resolve")
        assert resolved.is_success
        assert samples(scrape(server))[open_key] == 0  # dropped to 0, not vanished


def test_a_rejected_reload_sets_the_reload_gauge_to_0() -> None:
    metrics = Metrics()
    metrics.rules_reloaded(ok=True, at=1700000000.0)
    metrics.rules_reloaded(ok=False, at=1700000060.0)
    values = samples(metrics.render().decode())
    assert values[("outcomewatch_rules_last_reload_successful", ())] == 0
    assert values[("outcomewatch_rules_last_reload_success_timestamp_seconds", ())] == 1.7e9


def test_a_failing_store_read_leaves_its_metric_out_and_the_scrape_still_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()

    def broken() -> list[tuple[str, str, int]]:
        raise duckdb.IOException("could not write: No space left on device")

    def broken_queue() -> tuple[int, datetime | None]:
        raise duckdb.IOException("could not read: Input/output error")

    metrics.watch_open_incidents(broken)
    metrics.watch_notification_queue(broken_queue, clock=lambda: datetime.now(UTC))
    metrics.spans_received.labels("grpc").inc()
    app = create_app(Reader(duckdb.connect()), metrics=metrics.render)
    with TestClient(app) as client:
        for _ in range(3):
            response = client.get("/metrics")
            assert response.status_code == 200
            assert 'outcomewatch_spans_received_total{transport="grpc"} 1.0' in response.text
            assert "outcomewatch_open_incidents" not in response.text
            assert "outcomewatch_notifications_pending" not in response.text
    # One line per metric while the failure lasts, not one per scrape; never a traceback.
    left_out = [r for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 2 and not any(r.exc_info for r in left_out)
