"""Property-based fuzzing of the HTTP API against its own OpenAPI document (schemathesis).

The app is the real one (create_app) over a real DuckDB file holding representative rows: runs
of every status, incidents with failures and timelines, stored spans and outbox rows. Incident
actions run the real lifecycle SQL (store.incidents.act) on the same connection, writes are
guarded by an api token that the test sends, and /metrics and the rules admin are wired.

For every operation, every generated request (valid and invalid, from schemathesis' examples,
coverage and fuzzing phases) must:

- never be answered 5xx,
- be answered with a status code the OpenAPI document declares for the operation,
- have a body that conforms to the response schema declared for that status.

Generation is derandomized and bounded, so a run is repeatable and takes a few seconds; inputs
that once broke the API are kept below as explicit regression tests.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from schemathesis import Case as GenericCase
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from outcomewatch.api import create_app
from outcomewatch.api.routes.suggest import Suggester
from outcomewatch.offline.replay import backtest
from outcomewatch.offline.suggest import suggest
from outcomewatch.rules import RuleSet
from outcomewatch.rules.load import load_rules
from outcomewatch.rules.source import ReloadResult
from outcomewatch.store.queries import Reader
from outcomewatch.store.schema import DDL
from tests.api_support import SqlActions, index_traces

API_TOKEN = "fuzz-api-token"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
RULES_DIR = Path(__file__).resolve().parent.parent / "rules" / "examples"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=3)
TRACE_A = "0af7651916cd43dd8448eb211c80319c"
TRACE_B = "4bf92f3577b34da6a3ce929d0e0e4736"
ROOT, CHILD = "b7ad6b7169203331", "00f067aa0ba902b7"
TARGETS: dict[str, tuple[str, ...]] = {"pager": ("alertmanager", "webhook")}
Case = GenericCase[Any]
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


def ns(when: datetime) -> int:
    return int(when.timestamp() * 1e9)


# --- a real store with representative rows ----------------------------------------------------

DETAIL = {
    "error_spans": [{
        "name": "charge", "service": "payments", "span_id": CHILD, "kind": "client",
        "status": "error", "status_message": "card declined", "duration_ms": 12.5,
        "exceptions": [{"type": "CardError", "message": "declined", "stacktrace": "at charge()"}],
    }],
    "green_signals": [{"name": "POST /checkout", "service": "checkout", "span_id": ROOT,
                       "kind": "server", "status": "ok", "status_message": "",
                       "duration_ms": 250.0}],
    "offending": [{"name": "charge", "service": "payments", "span_id": CHILD, "kind": "client",
                   "status": "error", "status_message": "", "duration_ms": 1.0,
                   "trace_id": TRACE_A, "attributes": {"n": 2}, "exceptions": []}],
    "evidence": {"customer.id": "cus_1", "amount": 4200, "retry": True, "tags": ["a", "b"]},
    "resource": {"service.name": "checkout", "service.version": "1.2.3", "host.name": "web-1"},
    "trigger": {"name": "POST /checkout", "span_id": ROOT, "attributes": {"cart.items": 3}},
    "duration_ms": 1250.5,
    "span_count": 2,
    "scheduled_at": "2024-05-01T12:00:00+00:00",
}

# (id, rule, trace_id, status, opened_at, closed_at, reason, missing, late_outcomes, late_at,
#  incident_id)
RUNS = [
    ("run-1", "checkout", TRACE_A, "passed", minutes(1), minutes(2), None, [], [], None, None),
    ("run-2", "checkout", TRACE_B, "failed", minutes(2), minutes(4), "trace_idle",
     ["email.sent"], ["email.sent"], minutes(9), 1),
    ("run-3", "signup", TRACE_A, "open", minutes(3), None, None, [], [], None, None),
    ("run-4", "checkout", TRACE_A, "failed", minutes(3), minutes(8), "deadline",
     ["payment.captured", "email.sent"], [], None, 1),
]
# (id, rule, status, route, group_key, acknowledged_at, resolved_at)
INCIDENTS = [
    (1, "checkout", "open", "pager", '{"customer.id": "cus_1"}', None, None),
    (2, "signup", "acknowledged", "pager", "", minutes(30), None),
    (3, "checkout", "resolved", "pager", '{"customer.id": "cus_2"}', None, minutes(40)),
    (4, "signup", "open", "quiet", "", None, None),
]


def _kv(key: str, value: str | int) -> KeyValue:
    any_value = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(
        string_value=value)
    return KeyValue(key=key, value=any_value)


def _insert_span(conn: duckdb.DuckDBPyConnection, span: PbSpan, service: str) -> None:
    resource = Resource(attributes=[_kv("service.name", service), _kv("host.name", "web-1")])
    resource_id = sum(service.encode())
    conn.execute("INSERT INTO resources VALUES (?, ?) ON CONFLICT DO NOTHING",
                 [resource_id, resource.SerializeToString()])
    conn.execute(
        "INSERT INTO spans VALUES (?, ?, ?, ?, ?, 'fuzz', ?, ?, ?, ?, ?, ?, ?, ?)",
        [span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.name, service,
         span.kind, span.start_time_unix_nano, span.end_time_unix_nano, span.status.code,
         span.status.message, span.start_time_unix_nano, span.SerializeToString(), resource_id],
    )
    index_traces(conn)


def populate(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(DDL)
    conn.executemany(
        "INSERT INTO runs (id, rule, trace_id, status, opened_at, closed_at, reason, missing,"
        " late_outcomes, late_at, incident_id, trigger_span_id) VALUES"
        f" ({', '.join('?' * 11)}, '{ROOT}')", RUNS)
    conn.executemany(
        "INSERT INTO incidents (id, rule, status, severity, owner, route, opened_at,"
        " last_failure_at, failure_count, summary, description, group_key, acknowledged_at,"
        " resolved_at) VALUES (?, ?, ?, 'critical', 'team-pay', ?, ?, ?, 2,"
        " 'checkout: email.sent did not happen', 'A paid order must send its receipt.', ?, ?, ?)",
        [(i, rule, status, route, minutes(10 * i), minutes(10 * i + 5), group, acked, resolved)
         for i, rule, status, route, group, acked, resolved in INCIDENTS])
    conn.executemany(
        "INSERT INTO incident_failures (incident_id, run_id, rule, trace_id, failed_at, reason,"
        " missing, detail) VALUES (1, ?, 'checkout', ?, ?, ?, ?, ?)",
        [("run-4", TRACE_A, minutes(8), "deadline", ["email.sent"], json.dumps(DETAIL)),
         ("run-2", TRACE_B, minutes(4), "trace_idle", ["email.sent"], "{}")])
    conn.executemany(
        "INSERT INTO incident_events VALUES (?, ?, ?, ?, ?)",
        [(1, minutes(8), "opened", "outcomewatch", "checkout failed"),
         (1, minutes(9), "late_outcome", "outcomewatch", "email.sent arrived late"),
         (2, minutes(20), "opened", "outcomewatch", None),
         (2, minutes(30), "acknowledged", "dana", "looking")])
    conn.executemany(
        "INSERT INTO outbox (incident_id, transition, target, route, payload, status, attempts,"
        " created_at, next_attempt_at, sent_at, last_error) VALUES"
        " (?, ?, ?, 'pager', '{}', ?, ?, ?, ?, ?, ?)",
        [(1, "opened", "alertmanager", "sent", 1, minutes(8), minutes(8), minutes(8), None),
         (1, "opened", "webhook", "failed", 3, minutes(8), minutes(12), None, "HTTP 500: x"),
         (2, "acknowledged", "alertmanager", "pending", 0, minutes(30), minutes(30), None,
          None)])
    root = PbSpan(trace_id=bytes.fromhex(TRACE_A), span_id=bytes.fromhex(ROOT),
                  name="POST /checkout", kind=PbSpan.SPAN_KIND_SERVER,
                  start_time_unix_nano=ns(minutes(1)), end_time_unix_nano=ns(minutes(1.5)),
                  attributes=[_kv("cart.items", 3)])
    child = PbSpan(trace_id=bytes.fromhex(TRACE_A), span_id=bytes.fromhex(CHILD),
                   parent_span_id=bytes.fromhex(ROOT), name="charge",
                   kind=PbSpan.SPAN_KIND_CLIENT, start_time_unix_nano=ns(minutes(1.1)),
                   end_time_unix_nano=ns(minutes(1.2)),
                   status=Status(code=Status.STATUS_CODE_ERROR, message="card declined"),
                   events=[PbSpan.Event(name="exception", time_unix_nano=ns(minutes(1.15)),
                                        attributes=[_kv("exception.type", "CardError")])],
                   links=[PbSpan.Link(trace_id=bytes.fromhex(TRACE_B),
                                      span_id=bytes.fromhex(ROOT))])
    _insert_span(conn, root, "checkout")
    _insert_span(conn, child, "payments")


@dataclass
class ExampleRules:
    """RulesAdmin over the example rules; a reload loads the files again."""

    rules: RuleSet
    loaded_at: datetime
    last_reload: ReloadResult | None = None

    async def reload(self) -> ReloadResult:
        self.rules = load_rules([RULES_DIR])
        return ReloadResult(len(self.rules.rules), (), self.loaded_at)


def suggester(conn: duckdb.DuckDBPyConnection) -> Suggester:
    """Suggestions over the fuzzed store, counted back from NOW, as the server wires them."""
    def run(*, since: timedelta, trigger: str, min_traces: int) -> dict[str, Any]:
        return suggest(conn, since_ns=ns(NOW - since), trigger=trigger,
                       min_traces=min_traces)

    return run


def build_app(conn: duckdb.DuckDBPyConnection) -> FastAPI:
    async def run_backtest(rules_yaml: str, *, since: timedelta | None,
                           trace_idle: timedelta | None) -> dict[str, Any]:
        return backtest(conn, rules_yaml, since_ns=None,
                        idle=trace_idle or timedelta(seconds=10))

    return create_app(
        Reader(conn), actions=SqlActions(conn, at=NOW, targets_for_route=TARGETS),
        api_token=API_TOKEN, backtest=run_backtest,
        rules=ExampleRules(load_rules([RULES_DIR]), NOW),
        metrics=lambda: b"# HELP outcomewatch_up 1 when up\noutcomewatch_up 1\n",
        suggest=suggester(conn),
    )


@pytest.fixture(scope="module")
def conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[duckdb.DuckDBPyConnection]:
    path = tmp_path_factory.mktemp("fuzz") / "outcomewatch.duckdb"
    connection = duckdb.connect(str(path))
    connection.execute("SET GLOBAL TimeZone = 'Asia/Kolkata'")  # answers must still be UTC
    populate(connection)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def app(conn: duckdb.DuckDBPyConnection) -> FastAPI:
    return build_app(conn)


def store_down_app(tmp_path: Path) -> FastAPI:
    """The other extreme: the store's connection is closed (every read fails), the deployment is
    read-only (no actions), has no rules and no metrics, is not ready, and guards reads."""
    closed = duckdb.connect(str(tmp_path / "closed.duckdb"))
    closed.close()
    return create_app(Reader(closed), ready=lambda: False, api_token=API_TOKEN,
                      read_token="fuzz-read-token", suggest=suggester(closed))


@pytest.fixture(scope="module")
def down_app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    return store_down_app(tmp_path_factory.mktemp("down"))


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of an app built exactly as the fuzzed one. It does not depend on the
    stored rows, and schemathesis parametrizes by operation at collection time, so it is read
    from an app over a scratch in-memory database."""
    scratch = duckdb.connect(":memory:")
    try:
        return build_app(scratch).openapi()
    finally:
        scratch.close()


OPENAPI = openapi_document()
schema = schemathesis.openapi.from_dict(OPENAPI)
FUZZ = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("fixture", ["app", "down_app"])
def test_the_fuzzed_document_is_the_one_every_deployment_serves(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    served = TestClient(request.getfixturevalue(fixture)).get("/openapi.json")
    assert served.status_code == 200
    assert served.json() == OPENAPI


@schema.parametrize()
@FUZZ
def test_every_operation_conforms_to_its_openapi_contract(case: Case, app: FastAPI) -> None:
    case.call_and_validate(app=app, headers=AUTH, checks=CHECKS)


def only_503_among_server_errors(ctx: Any, response: Any, case: Case) -> None:
    """A failing store is 503 with Retry-After (documented); any other 5xx is a bug."""
    if response.status_code >= 500:
        assert response.status_code == 503, f"{case.method} {case.path}: {response.status_code}"
        assert response.headers.get("retry-after") or case.path in ("/healthz", "/readyz") or (
            response.json()["detail"] in ("no rules are loaded here", "no backtest here",
                                          "this deployment is read-only: no incident actions"))


@schema.parametrize()
@settings(FUZZ, max_examples=15)
def test_every_operation_conforms_when_the_store_is_down(case: Case, down_app: FastAPI) -> None:
    case.call_and_validate(
        app=down_app, headers=AUTH,
        checks=[only_503_among_server_errors, status_code_conformance,
                response_schema_conformance],
    )


# --- rich rows, exactly: random ids rarely hit stored rows, so these requests are spelled out ---


@pytest.fixture
def fresh_app(tmp_path: Path) -> Iterator[FastAPI]:
    connection = duckdb.connect(str(tmp_path / "outcomewatch.duckdb"))
    populate(connection)
    yield build_app(connection)
    connection.close()


STORED_ROWS = [
    ("GET", "/api/v1/incidents/{incident_id}", {"incident_id": 1}, None),
    ("GET", "/api/v1/incidents/{incident_id}", {"incident_id": 2}, {"failures": 1}),
    ("GET", "/api/v1/incidents/{incident_id}", {"incident_id": 3}, None),
    ("GET", "/api/v1/traces/{trace_id}", {"trace_id": TRACE_A}, None),
    ("GET", "/api/v1/runs", {}, {"trace_id": TRACE_A, "limit": 1}),
    ("GET", "/api/v1/runs", {}, {"status": "failed", "rule": "checkout"}),
    ("GET", "/api/v1/incidents", {}, {"status": "open", "limit": 1}),
    ("GET", "/api/v1/notifications", {}, {"incident_id": 1, "limit": 1}),
    ("POST", "/api/v1/incidents/{incident_id}/acknowledge", {"incident_id": 1}, None),
    ("POST", "/api/v1/incidents/{incident_id}/resolve", {"incident_id": 2}, None),
    ("POST", "/api/v1/incidents/{incident_id}/reopen", {"incident_id": 3}, None),
    ("POST", "/api/v1/incidents/{incident_id}/reopen", {"incident_id": 1}, None),  # 409
    ("POST", "/api/v1/rules/reload", {}, None),
]


@pytest.mark.parametrize(("method", "path", "path_parameters", "query"), STORED_ROWS)
def test_answers_about_stored_rows_conform_to_the_contract(
    fresh_app: FastAPI, method: str, path: str, path_parameters: dict[str, Any],
    query: dict[str, Any] | None,
) -> None:
    case = schema[path][method].Case(path_parameters=path_parameters, query=query)
    response = case.call_and_validate(app=fresh_app, headers=AUTH, checks=CHECKS)
    assert response.status_code in (200, 409)


# --- regression tests: inputs that once broke the contract ---------------------------------------


def test_a_body_that_is_not_utf8_is_a_documented_400(fresh_app: FastAPI) -> None:
    """Found by schemathesis: FastAPI answers an undecodable body with 400, which the action
    routes did not document."""
    operation = schema["/api/v1/incidents/{incident_id}/acknowledge"]["POST"]
    case = operation.Case(path_parameters={"incident_id": 1}, body=b"\xf1\x12",
                          media_type="application/json")
    response = case.call_and_validate(app=fresh_app, headers=AUTH, checks=CHECKS)
    assert (response.status_code, response.json()) == (
        400, {"detail": "There was an error parsing the body"})


@pytest.mark.parametrize("field", ["actor", "comment"])
def test_a_lone_surrogate_in_an_action_body_is_422_not_500(
    fresh_app: FastAPI, field: str
) -> None:
    """``"\\ud800"`` is valid JSON but no valid string: pydantic refuses it, and the default 422
    handler then failed to encode the echoed input (500)."""
    client = TestClient(fresh_app, headers=AUTH, raise_server_exceptions=False)
    response = client.post("/api/v1/incidents/1/acknowledge",
                           content=b'{"%s": "ok \\ud800"}' % field.encode(),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert (error["loc"], error["input"]) == (["body", field], "ok \\ud800")
    assert client.get("/api/v1/incidents/1").json()["status"] == "open"  # nothing was done


@pytest.mark.parametrize(
    ("url", "key"),
    [("/api/v1/runs", '[1714564800000000, "run-\\ud800"]'),
     ("/api/v1/runs", '[1714564800000000, "\\udfff"]')],
)
def test_a_cursor_with_a_lone_surrogate_is_400_not_503(
    fresh_app: FastAPI, url: str, key: str
) -> None:
    """The id decoded from the cursor's JSON reached duckdb, whose binding failed: a StoreError
    (503, "retry later") for what is the client's mistake."""
    cursor = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    response = TestClient(fresh_app, headers=AUTH).get(url, params={"cursor": cursor})
    assert (response.status_code, response.json()) == (400, {"detail": "invalid cursor"})


@pytest.mark.parametrize(
    ("method", "path", "path_parameters"),
    [("GET", "/api/v1/runs", {}), ("GET", "/api/v1/incidents", {}),
     ("GET", "/api/v1/incidents/{incident_id}", {"incident_id": 1}),
     ("GET", "/api/v1/traces/{trace_id}", {"trace_id": TRACE_A}),
     ("GET", "/api/v1/notifications", {}), ("GET", "/api/v1/rules", {}),
     ("POST", "/api/v1/rules/reload", {})],
)
def test_a_503_from_a_failing_store_or_a_missing_part_is_documented(
    down_app: FastAPI, method: str, path: str, path_parameters: dict[str, Any]
) -> None:
    """The reads answered an undocumented 503 when the store failed, and /rules one when no
    rules are loaded."""
    case = schema[path][method].Case(path_parameters=path_parameters)
    response = case.call_and_validate(
        app=down_app, headers=AUTH, checks=[status_code_conformance, response_schema_conformance])
    assert response.status_code == 503
