"""The read API over a real DuckDB file: rows are inserted with plain SQL, spans as real OTLP
protobuf bytes, exactly as the writer stores them."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from outcomewatch.api import create_app
from outcomewatch.model import RunStatus
from outcomewatch.store.queries import Reader
from outcomewatch.store.rows import InvalidCursor
from outcomewatch.store.schema import DDL
from tests.api_support import get_ok, index_traces

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TRACE_A = "0af7651916cd43dd8448eb211c80319c"
TRACE_B = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER_TRACE = "5b8efff798038103d269b633813fc60c"
ROOT, CHILD, LEAF = "b7ad6b7169203331", "00f067aa0ba902b7", "53995c3f42cd8ad8"


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


def ns(when: datetime) -> int:
    return int(when.timestamp()) * 1_000_000_000


# (id, rule, trace_id, status, opened_at, closed_at, reason, missing). Three runs share
# opened_at so that pages of 2 split a tie.
RUNS = [
    ("run-01", "checkout", TRACE_A, "passed", minutes(1), minutes(2), None, []),
    ("run-02", "checkout", TRACE_B, "failed", minutes(2), minutes(4), "trace_idle",
     ["payment.captured", "email.sent"]),
    ("run-03", "signup", "c" * 32, "open", minutes(3), None, None, []),
    ("run-04", "checkout", TRACE_A, "failed", minutes(3), minutes(8), "deadline", ["email.sent"]),
    ("run-05", "signup", "d" * 32, "passed", minutes(3), minutes(5), None, []),
    ("run-06", "checkout", "e" * 32, "open", minutes(5), None, None, []),
    ("run-07", "signup", TRACE_A, "failed", minutes(6), minutes(7), "trace_idle", ["welcome"]),
]
RUNS_NEWEST_FIRST = ["run-07", "run-06", "run-05", "run-04", "run-03", "run-02", "run-01"]

# (id, rule, status, last_failure_at); incidents 1 and 2 tie on last_failure_at.
INCIDENTS = [
    (1, "checkout", "open", minutes(10)),
    (2, "signup", "acknowledged", minutes(10)),
    (3, "checkout", "resolved", minutes(5)),
    (4, "checkout", "open", minutes(20)),
]
INCIDENTS_NEWEST_FIRST = [4, 2, 1, 3]

FULL_DETAIL = {
    "error_spans": [{
        "name": "charge", "service": "payments", "span_id": CHILD, "kind": "client",
        "status": "error", "status_message": "card declined", "duration_ms": 12.5,
        "exceptions": [{"type": "CardError", "message": "declined", "stacktrace": "at charge()"}],
        "attributes": {"http.response.status_code": 402, "provider.body": "<b>declined</b>"},
    }],
    "green_signals": [{
        "name": "POST /checkout", "service": "checkout", "span_id": ROOT, "kind": "server",
        "status": "ok", "status_message": "", "duration_ms": 1250.5,
    }],
    "span_count": 2,
    "evidence": {"http.status_code": 402, "retry": True},
    "resource": {"service.name": "checkout", "deployment.environment": "prod"},
    "trigger": {"name": "POST /checkout", "span_id": ROOT, "attributes": {"cart.items": 3}},
    "duration_ms": 1250.5,
}
# (run_id, trace_id, failed_at, reason, missing, detail): inserted out of time order.
FAILURES = [
    ("run-04", TRACE_A, minutes(8), "deadline", ["email.sent"], FULL_DETAIL),
    ("run-02", TRACE_B, minutes(4), "trace_idle", ["payment.captured"], {}),
    ("run-09", TRACE_A, minutes(10), "trace_idle", [], {"evidence": {"k": "v"}}),
]


def kv(key: str, value: str | int | bool | list[str]) -> KeyValue:
    if isinstance(value, bool):
        any_value = AnyValue(bool_value=value)
    elif isinstance(value, int):
        any_value = AnyValue(int_value=value)
    elif isinstance(value, list):
        any_value = AnyValue(
            array_value=ArrayValue(values=[AnyValue(string_value=v) for v in value])
        )
    else:
        any_value = AnyValue(string_value=value)
    return KeyValue(key=key, value=any_value)


def pb_span(trace_id: str, span_id: str, parent: str, name: str, start: datetime,
            **fields: Any) -> PbSpan:
    return PbSpan(
        trace_id=bytes.fromhex(trace_id), span_id=bytes.fromhex(span_id),
        parent_span_id=bytes.fromhex(parent), name=name,
        start_time_unix_nano=ns(start), end_time_unix_nano=ns(start) + 250_000_000, **fields,
    )


def insert_span(conn: duckdb.DuckDBPyConnection, span: PbSpan, service: str,
                received_ns: int) -> None:
    resource = Resource(attributes=[kv("service.name", service), kv("host.name", "web-1")])
    resource_id = hash(service) % 2**62
    conn.execute("INSERT INTO resources VALUES (?, ?) ON CONFLICT DO NOTHING",
                 [resource_id, resource.SerializeToString()])
    conn.execute(
        "INSERT INTO spans VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.name,
         service, "test-scope", span.kind, span.start_time_unix_nano, span.end_time_unix_nano,
         span.status.code, span.status.message, received_ns, span.SerializeToString(),
         resource_id],
    )
    index_traces(conn)


def insert_spans(conn: duckdb.DuckDBPyConnection) -> None:
    child = pb_span(
        TRACE_A, CHILD, ROOT, "charge", minutes(1), kind=PbSpan.SPAN_KIND_CLIENT,
        attributes=[kv("payment.amount", 4200), kv("payment.retry", False),
                    kv("tags", ["a", "b"])],
        status=Status(code=Status.STATUS_CODE_ERROR, message="card declined"),
        events=[PbSpan.Event(name="exception", time_unix_nano=ns(minutes(1)) + 5,
                             attributes=[kv("exception.type", "CardError")])],
        links=[PbSpan.Link(trace_id=bytes.fromhex(OTHER_TRACE),
                           span_id=bytes.fromhex(LEAF), attributes=[kv("why", "batch")])],
    )
    retried = PbSpan()
    retried.CopyFrom(child)
    retried.name = "charge (retried copy)"
    # The later copy is inserted first: de-dup must go by received_ns, not by insertion order.
    insert_span(conn, retried, "payments", received_ns=200)
    insert_span(conn, child, "payments", received_ns=100)
    insert_span(conn, pb_span(TRACE_A, LEAF, CHILD, "db.query", minutes(2)), "payments", 150)
    insert_span(conn, pb_span(TRACE_A, ROOT, "", "POST /checkout", minutes(0.5),
                              kind=PbSpan.SPAN_KIND_SERVER), "checkout", 100)
    insert_span(conn, pb_span(OTHER_TRACE, LEAF, "", "elsewhere", minutes(0)), "batch", 100)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(str(tmp_path / "outcomewatch.duckdb"))
    # A non-UTC session zone: the API must still answer in UTC.
    connection.execute("SET GLOBAL TimeZone = 'Asia/Kolkata'")
    connection.execute(DDL)
    connection.executemany("INSERT INTO runs (id, rule, trace_id, status, opened_at, closed_at,"
                           " reason, missing, trigger_span_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
                           " 'b7ad6b7169203331')", RUNS)
    connection.executemany(
        "INSERT INTO incidents (id, rule, status, severity, owner, route, opened_at,"
        " last_failure_at, failure_count, summary) VALUES (?, ?, ?, 'critical', 'team-pay',"
        " 'pager', ?, ?, 3, 'checkout did not complete')",
        [(i, rule, status, at - timedelta(hours=1), at) for i, rule, status, at in INCIDENTS],
    )
    connection.executemany(
        "INSERT INTO incident_failures (incident_id, run_id, rule, trace_id, failed_at, reason,"
        " missing, detail) VALUES (1, ?, 'checkout', ?, ?, ?, ?, ?)",
        [(run, trace, at, reason, missing, json.dumps(detail))
         for run, trace, at, reason, missing, detail in FAILURES],
    )
    insert_spans(connection)
    yield connection
    connection.close()


@pytest.fixture
def client(conn: duckdb.DuckDBPyConnection) -> TestClient:
    return TestClient(create_app(Reader(conn)))


def run_ids(body: dict[str, Any]) -> list[str]:
    return [run["id"] for run in body["runs"]]


def test_runs_are_listed_newest_first_with_ties_broken_by_id(client: TestClient) -> None:
    body = get_ok(client, "/api/v1/runs")
    assert run_ids(body) == RUNS_NEWEST_FIRST
    assert body["next_cursor"] is None


def test_a_run_has_every_contract_field_with_utc_iso_times(client: TestClient) -> None:
    run = get_ok(client, "/api/v1/runs", rule="checkout", status="failed", limit=1)["runs"][0]
    assert run == {
        "id": "run-04", "rule": "checkout", "trace_id": TRACE_A, "status": "failed",
        "opened_at": "2024-05-01T12:03:00Z", "closed_at": "2024-05-01T12:08:00Z",
        "reason": "deadline", "missing": ["email.sent"],
        "late_outcomes": [], "late_at": None, "incident_id": None,
        "due_at": None, "at_risk": [],
    }


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"rule": "signup"}, ["run-07", "run-05", "run-03"]),
        ({"status": "open"}, ["run-06", "run-03"]),
        ({"trace_id": TRACE_A}, ["run-07", "run-04", "run-01"]),
        ({"trace_id": TRACE_A, "rule": "checkout", "status": "passed"}, ["run-01"]),
        ({"rule": "no-such-rule"}, []),
    ],
)
def test_run_filters_all_apply(client: TestClient, params: dict[str, str],
                               expected: list[str]) -> None:
    assert run_ids(get_ok(client, "/api/v1/runs", **params)) == expected


@pytest.mark.parametrize("limit", [1, 2, 3, 6, 7])
def test_run_pages_cover_every_run_once_in_order(client: TestClient, limit: int) -> None:
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        body = get_ok(client, "/api/v1/runs", **params)
        assert len(body["runs"]) <= limit
        seen += run_ids(body)
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(body["runs"]) == limit
    assert seen == RUNS_NEWEST_FIRST


def test_run_pages_keep_the_filters_of_each_request(client: TestClient) -> None:
    first = get_ok(client, "/api/v1/runs", rule="checkout", limit=2)
    second = get_ok(client, "/api/v1/runs", rule="checkout", limit=2,
                    cursor=first["next_cursor"])
    assert run_ids(first) + run_ids(second) == ["run-06", "run-04", "run-02", "run-01"]
    assert second["next_cursor"] is None


def test_incident_pages_cover_every_incident_once_in_order(client: TestClient) -> None:
    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1} | ({"cursor": cursor} if cursor else {})
        body = get_ok(client, "/api/v1/incidents", **params)
        seen += [incident["id"] for incident in body["incidents"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == INCIDENTS_NEWEST_FIRST


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"status": "open"}, [4, 1]),
        ({"rule": "checkout"}, [4, 1, 3]),
        ({"status": "resolved", "rule": "checkout"}, [3]),
        ({"status": "acknowledged", "rule": "checkout"}, []),
    ],
)
def test_incident_filters_all_apply(client: TestClient, params: dict[str, str],
                                    expected: list[int]) -> None:
    body = get_ok(client, "/api/v1/incidents", **params)
    assert [incident["id"] for incident in body["incidents"]] == expected


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("url", "cursor"),
    [
        ("/api/v1/runs", "not base64 at all!"),
        ("/api/v1/runs", b64("not json")),
        ("/api/v1/runs", b64('{"a": 1}')),
        ("/api/v1/runs", b64("[1714564800000000, 7]")),  # an incidents cursor
        ("/api/v1/incidents", b64('[1714564800000000, "run-01"]')),  # a runs cursor
        ("/api/v1/incidents", b64("[true, 1]")),
        ("/api/v1/incidents", b64("[1714564800000000, 99999999999999999999]")),
        ("/api/v1/runs", b64('[99999999999999999999, "run-01"]')),
    ],
)
def test_a_cursor_we_did_not_issue_is_400(client: TestClient, url: str, cursor: str) -> None:
    response = client.get(url, params={"cursor": cursor})
    assert response.status_code == 400
    assert response.json() == {"detail": "invalid cursor"}


def test_reader_raises_value_error_for_a_bad_cursor(conn: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(ValueError, match="invalid cursor"):
        Reader(conn).list_runs(trace_id=None, rule=None, status=RunStatus.OPEN, limit=5,
                               cursor="%%%")
    assert issubclass(InvalidCursor, ValueError)


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/runs?trace_id=0AF7651916CD43DD8448EB211C80319C",
        "/api/v1/runs?trace_id=abc",
        "/api/v1/traces/0af7651916cd43dd8448eb211c80319",
        "/api/v1/traces/zzf7651916cd43dd8448eb211c80319c",
    ],
)
def test_a_malformed_trace_id_is_422_naming_the_expected_format(client: TestClient,
                                                                 url: str) -> None:
    response = client.get(url)
    assert response.status_code == 422
    assert "^[0-9a-f]{32}$" in response.text
    assert "trace_id" in json.dumps(response.json()["detail"][0]["loc"])


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/runs?status=closed",
        "/api/v1/incidents?status=open,resolved",
        "/api/v1/runs?limit=0",
        "/api/v1/incidents?limit=1001",
        "/api/v1/incidents/abc",
        "/api/v1/incidents/99999999999999999999",
    ],
)
def test_an_out_of_contract_parameter_is_422(client: TestClient, url: str) -> None:
    assert client.get(url).status_code == 422


def test_an_unknown_incident_is_404_with_its_id(client: TestClient) -> None:
    response = client.get("/api/v1/incidents/7")
    assert response.status_code == 404
    assert response.json() == {"detail": "incident 7 not found"}


def test_an_incident_has_the_list_fields_plus_its_failures(client: TestClient) -> None:
    listed = get_ok(client, "/api/v1/incidents", status="open", rule="checkout", limit=2)
    item = listed["incidents"][1]
    detail = get_ok(client, "/api/v1/incidents/1")
    assert {k: detail[k] for k in item} == item
    assert set(detail) - set(item) == {"description", "timeline", "failures"}
    assert item["last_failure_at"] == "2024-05-01T12:10:00Z"


def test_incident_failures_are_newest_first(client: TestClient) -> None:
    failures = get_ok(client, "/api/v1/incidents/1")["failures"]
    assert [f["run_id"] for f in failures] == ["run-09", "run-04", "run-02"]
    assert [f["failed_at"] for f in failures] == [
        "2024-05-01T12:10:00Z", "2024-05-01T12:08:00Z", "2024-05-01T12:04:00Z"]


def test_a_failure_reads_its_fields_from_the_detail_json(client: TestClient) -> None:
    failure = get_ok(client, "/api/v1/incidents/1")["failures"][1]
    stored = {"run_id": "run-04", "trace_id": TRACE_A, "failed_at": "2024-05-01T12:08:00Z",
              "reason": "deadline", "missing": ["email.sent"], "trigger": FULL_DETAIL["trigger"],
              "evidence": FULL_DETAIL["evidence"], "offending": [], "scheduled_at": None,
              "late_outcomes": [], "late_at": None}
    assert {key: failure[key] for key in stored} == stored


def test_a_failure_takes_its_span_evidence_from_the_stored_trace(client: TestClient) -> None:
    failure = get_ok(client, "/api/v1/incidents/1")["failures"][1]
    assert failure["span_count"] == 3  # the spans of TRACE_A, each once
    [error] = failure["error_spans"]
    assert (error["name"], error["status_message"]) == ("charge", "card declined")
    assert error["exceptions"][0]["type"] == "CardError"
    assert failure["resource"]["host.name"] == "web-1"  # from the stored resources


def test_a_failure_with_a_sparse_detail_gets_empty_values(client: TestClient) -> None:
    failure = get_ok(client, "/api/v1/incidents/1")["failures"][2]
    assert failure["run_id"] == "run-02"
    assert failure["error_spans"] == []
    assert failure["evidence"] == failure["resource"] == failure["trigger"] == {}
    assert failure["duration_ms"] is None


def test_reader_limits_the_failures_of_an_incident(conn: duckdb.DuckDBPyConnection) -> None:
    detail = Reader(conn).get_incident(1, failures_limit=1)
    assert detail is not None
    assert [f.run_id for f in detail.failures] == ["run-09"]


def test_an_unknown_trace_is_404(client: TestClient) -> None:
    response = client.get(f"/api/v1/traces/{'f' * 32}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"trace {'f' * 32} not found"}


def test_a_trace_lists_each_span_once_ordered_by_start(client: TestClient) -> None:
    body = get_ok(client, f"/api/v1/traces/{TRACE_A}")
    assert body["trace_id"] == TRACE_A
    assert [s["span_id"] for s in body["spans"]] == [ROOT, CHILD, LEAF]


def test_a_retried_span_keeps_the_first_received_copy(client: TestClient) -> None:
    spans = get_ok(client, f"/api/v1/traces/{TRACE_A}")["spans"]
    assert [s["name"] for s in spans if s["span_id"] == CHILD] == ["charge"]


def test_a_trace_span_is_fully_decoded(client: TestClient) -> None:
    span = get_ok(client, f"/api/v1/traces/{TRACE_A}")["spans"][1]
    assert span == {
        "trace_id": TRACE_A, "span_id": CHILD, "parent_span_id": ROOT, "name": "charge",
        "service": "payments", "kind": "client",
        "start_ns": ns(minutes(1)), "end_ns": ns(minutes(1)) + 250_000_000,
        "start": "2024-05-01T12:01:00Z", "end": "2024-05-01T12:01:00.250000Z",
        "duration_ms": 250.0, "status": "error", "status_message": "card declined",
        "attributes": {"payment.amount": 4200, "payment.retry": False, "tags": ["a", "b"]},
        "resource": {"service.name": "payments", "host.name": "web-1"},
        "events": [{"name": "exception", "time_ns": ns(minutes(1)) + 5,
                    "attributes": {"exception.type": "CardError"}}],
        "links": [{"trace_id": OTHER_TRACE, "span_id": LEAF, "attributes": {"why": "batch"}}],
    }


def test_a_root_span_has_an_empty_parent_and_its_kind_name(client: TestClient) -> None:
    root = get_ok(client, f"/api/v1/traces/{TRACE_A}")["spans"][0]
    assert (root["parent_span_id"], root["kind"], root["status"]) == ("", "server", "unset")


def test_healthz_is_ok_when_ready(conn: duckdb.DuckDBPyConnection) -> None:
    response = TestClient(create_app(Reader(conn), ready=lambda: True)).get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_healthz_is_503_starting_until_ready(conn: duckdb.DuckDBPyConnection) -> None:
    response = TestClient(create_app(Reader(conn), ready=lambda: False)).get("/healthz")
    assert (response.status_code, response.json()) == (503, {"status": "starting"})


def test_a_store_failure_is_503_without_internals(tmp_path: Path) -> None:
    closed = duckdb.connect(str(tmp_path / "closed.duckdb"))
    closed.close()
    response = TestClient(create_app(Reader(closed))).get("/api/v1/incidents")
    assert response.status_code == 503
    assert response.json() == {"detail": "store unavailable"}


def test_openapi_documents_every_route_with_a_title(conn: duckdb.DuckDBPyConnection) -> None:
    schema = get_ok(TestClient(create_app(Reader(conn), title="ow-test")), "/openapi.json")
    assert schema["info"]["title"] == "ow-test"
    assert schema["info"]["description"]
    assert set(schema["paths"]) == {
        "/healthz", "/readyz", "/metrics", "/api/v1/runs", "/api/v1/incidents",
        "/api/v1/incidents/{incident_id}", "/api/v1/traces/{trace_id}",
        "/api/v1/notifications", "/api/v1/incidents/{incident_id}/acknowledge",
        "/api/v1/incidents/{incident_id}/resolve", "/api/v1/incidents/{incident_id}/reopen",
        "/api/v1/rules", "/api/v1/rules/reload", "/api/v1/search", "/api/v1/replay",
        "/api/v1/suggestions",
    }
    for url, path in schema["paths"].items():
        for operation in path.values():
            assert operation["tags"]
            if url != "/metrics":  # plain text, not JSON
                assert "$ref" in json.dumps(operation["responses"]["200"])


def test_reader_serves_concurrent_callers(conn: duckdb.DuckDBPyConnection) -> None:
    reader = Reader(conn)

    def read(_: int) -> tuple[int, int]:
        runs = reader.list_runs(trace_id=None, rule=None, status=None, limit=100, cursor=None)
        spans = reader.get_trace(TRACE_A) or []
        return len(runs.items), len(spans)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(read, range(64))) == {(7, 3)}
