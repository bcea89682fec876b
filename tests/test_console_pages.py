"""The console pages and GET /api/v1/search against a real server (real sockets, a real DuckDB
file, spans sent by the official SDK exporter), read over HTTP as a browser would fetch them.
The browser itself is in test_console_browser.py."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.trace import Tracer

from outcomewatch.clock import ManualClock
from outcomewatch.demo import crm_task, payment_failed, scheduled_report
from tests.harness import RunningServer, running_server

SCRIPT = "<script>window.pwned = 1</script>"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[RunningServer]:
    # The clock starts at the real now: the SDK stamps spans with the real time.
    with running_server(tmp_path, clock=ManualClock(datetime.now(UTC))) as running:
        yield running


def services(server: RunningServer) -> Callable[[str], Tracer]:
    """A tracer per service, as the demo's stories take them, exporting to ``server``."""
    return functools.cache(lambda service: server.tracer("grpc", **{"service.name": service}))


def incidents(server: RunningServer, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = server.wait_for(
        lambda: (lambda i: i if len(i) >= count else None)(
            server.get("/api/v1/incidents")["incidents"]),
        what=f"{count} incident(s)")
    return found


def page(server: RunningServer, path: str, **params: Any) -> httpx.Response:
    response = server.api.get(path, params=params)
    assert response.headers["content-type"].startswith("text/html"), path
    return response


def test_the_first_page_lists_each_incident_with_owner_route_and_summary(live):
    crm_task(services(live), 1, accepted=False)
    (incident,) = incidents(live, 1)

    response = page(live, "/")
    assert response.status_code == 200
    html = response.text
    assert f'href="/incidents/{incident["id"]}"' in html
    for text in ("crm-sync-reconciled", "integrations", "integrations-oncall",
                 '<strong id="count-open">1</strong> open incident<'):
        assert text in html
    assert 'datetime="' in html  # times are machine-readable for the "3 min ago" rendering


def test_every_page_is_served_with_a_strict_content_security_policy(live):
    crm_task(services(live), 1, accepted=False)
    (incident,) = incidents(live, 1)
    (run,) = live.runs()
    for path in ("/", f"/incidents/{incident['id']}", f"/traces/{run['trace_id']}", "/runs",
                 "/rules", "/search?q=task-demo501"):
        response = page(live, path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "unsafe" not in policy, path
        assert "<script>" not in response.text  # no inline script: only <script src=...>
        assert not re.search(r"(src|href)=\"(https?:)?//", response.text), path  # nothing remote


def test_the_incident_file_names_what_was_missing_and_the_error_message(live):
    crm_task(services(live), 1, accepted=False)
    (incident,) = incidents(live, 1)

    html = page(live, f"/incidents/{incident['id']}").text
    assert 'class="missing-box"' in html and '<code class="missing">external.update</code>' in html
    assert "422: property &#39;lifecyclestage&#39; invalid" in html
    assert "hs-contact-5501" in html  # the retry context: the external id
    assert 'class="wf-row placeholder"' in html  # the missing outcome drawn in the waterfall


def test_span_strings_are_escaped_on_every_page_that_shows_them(live):
    tracer = live.tracer("grpc", **{"service.name": "reports", "host.name": SCRIPT})
    with tracer.start_as_current_span("report.generate", attributes={
            "report.schedule": "daily", "report.id": SCRIPT, "customer.id": "cus_x"}):
        pass
    (run,) = live.wait_for(live.runs, what="the run")
    live.advance(timedelta(minutes=31))
    (incident,) = incidents(live, 1)

    for path in (f"/traces/{run['trace_id']}", f"/incidents/{incident['id']}"):
        html = page(live, path).text
        assert SCRIPT not in html, path
        assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in html, path


def test_search_finds_the_runs_of_a_customer_and_says_which_key_matched(live):
    payment_failed(services(live), 7, outcome="ok")
    payment_failed(services(live), 8, outcome="ok")
    live.wait_for(lambda: len(live.runs()) == 2, what="two runs")

    body = live.get("/api/v1/search", q="cus_demo007")
    assert body["trace_id"] is None
    (run,) = body["runs"]
    assert run["rule"] == "payment-failed-updates-access"
    assert run["matched"] == ["customer.id"]
    assert live.get("/api/v1/search", q="  cus_demo007 ")["runs"][0]["id"] == run["id"]
    assert live.get("/api/v1/search", q="cus_nobody")["runs"] == []
    html = page(live, "/search", q="cus_demo007").text
    assert f'href="/traces/{run["trace_id"]}"' in html


def test_search_pages_through_many_runs_newest_first(live):
    tracer = live.tracer("grpc", **{"service.name": "reports"})
    for _ in range(3):
        with tracer.start_as_current_span("report.generate", attributes={
                "report.schedule": "daily", "customer.id": "cus_many"}):
            pass
    live.wait_for(lambda: len(live.runs()) == 3, what="three runs")

    first = live.get("/api/v1/search", q="cus_many", limit=2)
    second = live.get("/api/v1/search", q="cus_many", limit=2, cursor=first["next_cursor"])
    ids = [r["id"] for r in first["runs"] + second["runs"]]
    assert ids == [r["id"] for r in live.runs()]  # the same order as /api/v1/runs
    assert second["next_cursor"] is None
    bad = live.api.get("/api/v1/search", params={"q": "cus_many", "cursor": "nonsense"})
    assert bad.status_code == 400


def test_a_trace_id_is_searched_as_that_trace(live):
    scheduled_report(services(live), 1, delivered=True)
    (run,) = live.wait_for(live.runs, what="the run")

    body = live.get("/api/v1/search", q=run["trace_id"])
    assert body["trace_id"] == run["trace_id"]
    assert [r["id"] for r in body["runs"]] == [run["id"]]
    assert live.get("/api/v1/search", q="0" * 32)["trace_id"] is None
    response = live.api.get("/search", params={"q": run["trace_id"]})
    assert response.status_code == 303
    assert response.headers["location"] == f"/traces/{run['trace_id']}"


def test_an_open_run_is_due_at_its_deadline_and_a_closed_one_is_not_due(live):
    payment_failed(services(live), 1, outcome="no_job")
    (run,) = live.wait_for(live.runs, what="the run")
    assert run["status"] == "open"
    assert run["at_risk"] == []
    due = datetime.fromisoformat(run["due_at"])
    assert timedelta(minutes=9) < due - datetime.fromisoformat(run["opened_at"]) <= \
        timedelta(minutes=10, seconds=1)
    assert 'class="countdown"' in page(live, "/runs", status="open").text

    live.advance(timedelta(minutes=11))
    closed = live.verdict(run["trace_id"], run["rule"])
    assert closed["due_at"] is None


def test_the_runs_page_filters_by_reason(live):
    crm_task(services(live), 1, accepted=False)
    crm_task(services(live), 2, accepted=True)
    live.wait_for(lambda: {r["status"] for r in live.runs()} == {"passed", "failed"},
                  what="both verdicts")

    forbidden = page(live, "/runs", reason="forbidden").text
    passed = page(live, "/runs", status="passed").text
    assert "forbidden" in forbidden and 'class="pill s-failed"' in forbidden
    assert 'class="pill s-passed"' not in forbidden
    assert 'class="pill s-passed"' in passed and 'class="pill s-failed"' not in passed


def test_the_rules_page_shows_each_rule_with_its_counts_and_chart(live):
    crm_task(services(live), 1, accepted=True)
    live.wait_for(lambda: live.runs(status="passed"), what="a pass")

    html = page(live, "/rules").text
    assert "crm-sync-reconciled" in html and "04-queue-reconciled.yaml" in html
    assert "1 passed" in html
    assert '<rect class="pass"' in html


def test_unknown_incidents_and_traces_are_a_page_saying_so(live):
    assert page(live, "/incidents/999").status_code == 404
    response = page(live, f"/traces/{'a' * 32}")
    assert response.status_code == 404 and f"trace {'a' * 32} not found" in response.text


def test_docs_and_redoc_use_only_assets_served_here(live):
    for path, asset in (("/docs", "/static/docs/swagger-ui-bundle.js"),
                        ("/redoc", "/static/docs/redoc.standalone.js")):
        html = live.api.get(path).text
        assert asset in html
        assert "cdn" not in html.lower() and "https://" not in html
        served = live.api.get(asset)
        assert served.status_code == 200 and "javascript" in served.headers["content-type"]
    assert live.api.get("/static/console/docs.js").status_code == 200
    assert live.api.get("/openapi.json").json()["paths"]["/api/v1/search"]


def test_with_a_read_token_pages_ask_for_it_and_accept_it_as_a_session_cookie(tmp_path):
    import duckdb

    from outcomewatch.api.app import create_app
    from outcomewatch.store.queries import Reader
    from outcomewatch.store.schema import DDL
    from tests.servers import running_asgi

    conn = duckdb.connect(str(tmp_path / "ow.duckdb"))
    conn.execute(DDL)
    app = create_app(Reader(conn), read_token="r3ad t0ken")
    with running_asgi(app) as base, httpx.Client(base_url=base) as client:
        refused = client.get("/")
        assert refused.status_code == 401 and 'id="login"' in refused.text
        assert "Incidents" not in refused.text.split("<main>")[1]
        client.cookies.set("outcomewatch_token", "r3ad%20t0ken")
        assert client.get("/").status_code == 200
        assert client.get("/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    conn.close()


def test_a_run_at_risk_shows_its_spans_in_the_api_on_the_runs_page_and_in_the_header(tmp_path):
    # The engine fills runs.at_risk (not yet); here the row is written as the writer will.
    import duckdb

    from outcomewatch.api.app import create_app
    from outcomewatch.store.queries import Reader
    from outcomewatch.store.schema import DDL, migrate
    from tests.servers import running_asgi

    conn = duckdb.connect(str(tmp_path / "ow.duckdb"))
    conn.execute(DDL)
    migrate(conn)  # idempotent on a file that already has the columns
    conn.execute(
        "INSERT INTO runs (id, rule, trace_id, trigger_span_id, status, opened_at, deadline_at,"
        " at_risk) VALUES ('r1', 'report', ?, ?, 'open', now(), now() + INTERVAL 10 MINUTE, ?)",
        ["ab" * 16, "cd" * 8,
         '[{"name": "email.delivered", "status_message": "<b>550 mailbox unavailable</b>"}]'])
    with running_asgi(create_app(Reader(conn))) as base, httpx.Client(base_url=base) as client:
        (run,) = client.get("/api/v1/runs").json()["runs"]
        assert run["at_risk"] == [
            {"name": "email.delivered", "status_message": "<b>550 mailbox unavailable</b>"}]
        assert run["due_at"] is not None
        html = client.get("/runs").text
        assert 'class="pill s-risk"' in html
        assert "&lt;b&gt;550 mailbox unavailable&lt;/b&gt;" in html
        assert '<strong id="count-risk">1</strong>' in client.get("/").text
        no_rules = client.get("/rules")  # an app without a RulesAdmin: read-only
        assert no_rules.status_code == 503 and "no rules are loaded here" in no_rules.text
    conn.close()


def test_the_migration_adds_at_risk_to_a_file_made_before_it(tmp_path):
    import duckdb

    from outcomewatch.store.queries import Reader
    from outcomewatch.store.schema import DDL, migrate

    conn = duckdb.connect(str(tmp_path / "old.duckdb"))
    conn.execute(DDL.replace(",\n    -- Spans that matched", "\n    -- Spans that matched", 1)
                 .replace("    at_risk JSON NOT NULL DEFAULT '[]'\n", ""))
    conn.execute("INSERT INTO runs (id, rule, trace_id, trigger_span_id, status, opened_at)"
                 " VALUES ('r0', 'old', ?, ?, 'passed', now())", ["ab" * 16, "cd" * 8])
    conn.execute("INSERT INTO schema_version VALUES (1)")
    migrate(conn)
    migrate(conn)
    (run,) = Reader(conn).list_runs_by(limit=10).items
    assert (run.id, run.at_risk, run.due_at) == ("r0", (), None)
    conn.close()
