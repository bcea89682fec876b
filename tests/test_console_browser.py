"""The console in a real headless Chromium (Debian's ``chromium``, driven by Playwright with
``executable_path``: Playwright never downloads a browser here), against a real server filled by
the demo's stories through the official SDK exporter.

Screenshots of /, an incident file and a trace waterfall, at 1,280 px and at phone width, go to
``screenshots/`` under the test's temporary directory (and to /tmp/console-shots/ for a person to
look at)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from playwright import sync_api

from outcomewatch.clock import ManualClock
from outcomewatch.demo import play_round
from tests.harness import RunningServer, running_server
from tests.system import require

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS_FOR_PEOPLE = Path("/tmp/console-shots")
SCRIPT = "<script>window.pwned = 1</script>"
# The demo's stories whose broken runs fail at once (forbid): their incidents are there as soon
# as the spans are.
FAIL_AT_ONCE = {"scheduled-report-delivered", "model-batch-results-visible",
                "crm-sync-reconciled", "backup-restore-proven", "payment-failed-updates-access"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require("chromium")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One demo round for the module's tests (a test that changes an incident uses its own)."""
    tmp_path = tmp_path_factory.mktemp("demo")
    with running_server(tmp_path, clock=ManualClock(datetime.now(UTC))) as server:
        play_round(server.grpc_endpoint, 1)
        server.wait_for(lambda: {
            i["rule"] for i in server.get("/api/v1/incidents")["incidents"]} >= FAIL_AT_ONCE,
            what="the demo's incidents")
        yield server


@pytest.fixture
def page(browser: Any, demo: RunningServer) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  base_url=str(demo.api.base_url))
    opened = context.new_page()
    errors: list[str] = []
    opened.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    opened.on("pageerror", lambda e: errors.append(str(e)))
    yield opened
    context.close()
    assert errors == []  # no CSP violation, no script error on any page a test opened


def shoot(page: Any, tmp_path: Path, name: str) -> None:
    folder = tmp_path / "screenshots"
    folder.mkdir(exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
    SHOTS_FOR_PEOPLE.mkdir(exist_ok=True)
    shutil.copy(folder / f"{name}.png", SHOTS_FOR_PEOPLE / f"{name}.png")


def test_the_demos_incidents_appear_on_the_first_page(page, demo, tmp_path):
    page.goto("/")
    api = demo.get("/api/v1/incidents")["incidents"]
    rows = page.locator("table.incidents tbody tr")
    assert rows.count() == len(api)
    listed = page.locator("a.incident-link strong").all_inner_texts()
    assert set(listed) == {i["rule"] for i in api}
    assert page.locator("#count-open").inner_text() == str(len(api))
    shoot(page, tmp_path, "index")


def test_clicking_an_incident_opens_its_file_with_the_missing_step_and_error(page, demo,
                                                                             tmp_path):
    page.goto("/")
    page.get_by_role("link", name="crm-sync-reconciled").click()
    page.wait_for_url("**/incidents/*")
    missing = page.locator(".failure .missing-box").first
    assert missing.is_visible()
    assert "external.update" in missing.inner_text()
    assert page.get_by_text("422: property 'lifecyclestage' invalid").first.is_visible()
    assert page.locator(".waterfall .placeholder").first.is_visible()
    shoot(page, tmp_path, "incident")


def test_acknowledging_from_the_page_changes_the_status_in_the_api(page, demo):
    (incident,) = demo.get("/api/v1/incidents", rule="model-batch-results-visible")["incidents"]
    page.goto(f"/incidents/{incident['id']}")
    page.fill("#comment", "looking at the schema change")
    page.fill("#actor", "dana")
    page.get_by_role("button", name="Acknowledge").click()
    page.wait_for_selector("#incident-status .s-acknowledged")

    after = demo.get(f"/api/v1/incidents/{incident['id']}")
    assert after["status"] == "acknowledged"
    assert (after["timeline"][-1]["actor"], after["timeline"][-1]["comment"]) == (
        "dana", "looking at the schema change")


def test_the_search_box_finds_a_run_by_customer_id(page, demo):
    page.goto("/rules")
    page.fill("#q", "cus_rep001")
    page.press("#q", "Enter")
    page.wait_for_url("**/search?q=cus_rep001")
    rows = page.locator("table.runs tbody tr")
    assert rows.count() == 1
    assert "scheduled-report-delivered" in rows.first.inner_text()
    assert "customer.id" in rows.first.inner_text()


def test_a_trace_waterfall_shows_each_span_and_its_attributes_on_click(page, demo, tmp_path):
    (run,) = demo.runs(rule="payment-failed-updates-access", status="passed")
    page.goto(f"/traces/{run['trace_id']}")
    names = page.locator(".wf-row .wf-name").all_inner_texts()
    assert names[0].strip() == "stripe.webhook"
    assert {"entitlement.updated", "email.delivered"} <= {n.strip() for n in names}
    page.locator(".wf-row summary", has_text="stripe.webhook").click()
    assert page.get_by_text("cus_demo001").first.is_visible()
    shoot(page, tmp_path, "trace")


def test_a_span_attribute_holding_a_script_tag_renders_as_text(page, demo):
    tracer = demo.tracer("grpc", **{"service.name": "reports"})
    with tracer.start_as_current_span("report.generate", attributes={
            "report.schedule": "daily", "report.id": "rep_xss", "note": SCRIPT}) as span:
        trace_id = f"{span.get_span_context().trace_id:032x}"
    demo.wait_for(lambda: demo.runs(trace_id=trace_id), what="the run")

    page.goto(f"/traces/{trace_id}")
    page.locator(".wf-row summary", has_text="report.generate").click()
    assert page.get_by_text(SCRIPT).is_visible()
    assert page.evaluate("typeof window.pwned") == "undefined"


def test_the_pages_fit_a_phone_screen(browser, demo, tmp_path):
    context = browser.new_context(viewport={"width": 390, "height": 844},
                                  base_url=str(demo.api.base_url))
    phone = context.new_page()
    try:
        (incident,) = demo.get("/api/v1/incidents", rule="crm-sync-reconciled")["incidents"]
        for path, name in (("/", "index-phone"), (f"/incidents/{incident['id']}",
                                                   "incident-phone")):
            phone.goto(path)
            # Nothing wider than the screen: no sideways scrolling to read a row.
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390, path
            shoot(phone, tmp_path, name)
    finally:
        context.close()


def test_docs_and_redoc_render_with_every_request_to_another_host_refused(browser, demo):
    base = str(demo.api.base_url)
    context = browser.new_context(base_url=base)
    remote: list[str] = []

    def only_here(route: Any) -> None:
        if route.request.url.startswith(base):
            route.continue_()
        else:  # what a machine without internet access would see
            remote.append(route.request.url)
            route.abort()

    context.route("**/*", only_here)
    page = context.new_page()
    try:
        page.goto("/docs")
        assert "outcomewatch" in page.locator(".swagger-ui .info .title").inner_text()
        page.goto("/redoc")
        assert "outcomewatch" in page.locator("h1").first.inner_text()
    finally:
        context.close()
    assert remote == []
