"""Strings from spans and rules are data everywhere they go: notifications, templates, SQL.

One failed run is taken through the real path: a rule file (loaded by the rule loader), a trigger
span decoded from OTLP protobuf whose attribute values hold quotes, backslashes, newlines, a
``</script>`` injection, Jinja syntax and non-ASCII text; its evidence, summary and group values
as the server computes them; the real Store (incident, outbox rows); the real Notifier and
senders posting to a mock HTTP transport; the real config loader compiling webhook templates in
its sandbox. Every body must be valid JSON (strictly: no NaN) that gives back the exact strings;
a template can neither run code nor reach attributes outside the sandbox; values are never
evaluated as templates. The API's ``rule=`` filters match literally, with no SQL injection and no
LIKE wildcards.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from outcomewatch.analyzer.evidence import evidence_keys, failure_summary, verdict_detail
from outcomewatch.analyzer.runs import group_values
from outcomewatch.api import create_app
from outcomewatch.clock import ManualClock
from outcomewatch.config import load_config
from outcomewatch.incidents import Notifier
from outcomewatch.incidents.lifecycle import group_key
from outcomewatch.model import FailureReason, RunFailed, Span
from outcomewatch.otlp import batch_from_request
from outcomewatch.otlp_decode import decode_stored_span
from outcomewatch.rules import Rule
from outcomewatch.rules.load import load_rules
from outcomewatch.rules.policy import policy_of
from outcomewatch.store.duckdb import Store
from outcomewatch.store.queries import Reader
from outcomewatch.store.schema import DDL
from outcomewatch.store.verdicts import Judged, VerdictBatch

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TRACE = "0af7651916cd43dd8448eb211c80319c"
TRIGGER_ID, CHILD_ID = "b7ad6b7169203331", "00f067aa0ba902b7"
AM_URL, HOOK_URL = "http://alertmanager.test:9093", "http://hooks.test/outcomes"

# Each piece on its own, and all of them in one value.
PIECES = {
    "quote": 'say "hi"',
    "single": "it's",
    "backslash": "C:\\path\\to\\file \\n \\u0041 \\",
    "newlines": "line 1\nline 2\r\nline 3\ttabbed",
    "script": "</script><script>alert(1)</script>",
    "jinja": "{{ 7*7 }}",
    "jinja_block": "{% for x in range(3) %}{{ x }}{% endfor %}",
    "unicode": "Zoë ☃ 日本語 🚀 \u2028\u2029 ﬁ",
    "control": "nul\x00 esc\x1b del\x7f",
}
NASTY = " | ".join(PIECES.values())
# The rule file is YAML, which cannot hold every control character: those stay in span values.
RULE_TEXT = " | ".join(v for k, v in PIECES.items() if k != "control")
EVIDENCE_KEY = 'note "key" \\ </script> {{ 7*7 }}'
JSON_TEMPLATE = """{"summary": {{ incident.summary | tojson }},
 "description": {{ incident.description | tojson }},
 "customer": {{ incident.group["customer.id"] | tojson }},
 "group": {{ incident.group | tojson }},
 "transition": {{ transition | tojson }}, "url": {{ url | tojson }}}"""


def strict_json(body: bytes) -> Any:
    """``body`` parsed as RFC 8259 JSON: UTF-8, and no NaN or Infinity (Python allows them)."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(body.decode("utf-8"), parse_constant=refuse)


# --- one failed run, through the real components ----------------------------------------------


def write_rule(tmp_path: Path) -> Rule:
    rule = {
        "name": "checkout-receipt",
        "description": RULE_TEXT,
        "owner": "billing",
        "route": "pager",
        "severity": "critical",
        "trigger": {"span": "checkout.request"},
        "expect": [{"span": 'email "sent" </script>{{ 7*7 }}'}],
        "group_by": ["customer.id"],
        "evidence": ["customer.id", EVIDENCE_KEY, "amount"],
    }
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"rules": [rule]}, allow_unicode=True), encoding="utf-8")
    [loaded] = load_rules([path]).rules
    return loaded


def _kv(key: str, value: str | int | float) -> KeyValue:
    if isinstance(value, str):
        return KeyValue(key=key, value=AnyValue(string_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(double_value=value))


def trace_spans(customer: str | float) -> list[Span]:
    """The trigger and an error child, serialised and decoded as the store keeps them."""
    resource = Resource(attributes=[_kv("service.name", "shop"), _kv("host.name", NASTY)])
    start = int(T0.timestamp() * 1e9)
    trigger = PbSpan(
        trace_id=bytes.fromhex(TRACE), span_id=bytes.fromhex(TRIGGER_ID),
        name="checkout.request", start_time_unix_nano=start, end_time_unix_nano=start + 10**9,
        attributes=[_kv("customer.id", customer), _kv(EVIDENCE_KEY, NASTY), _kv("amount", 4200),
                    _kv("retry.context", NASTY)],
    )
    child = PbSpan(
        trace_id=bytes.fromhex(TRACE), span_id=bytes.fromhex(CHILD_ID),
        parent_span_id=bytes.fromhex(TRIGGER_ID), name="email.send",
        start_time_unix_nano=start + 1, end_time_unix_nano=start + 2,
        status=Status(code=Status.STATUS_CODE_ERROR, message=NASTY),
        events=[PbSpan.Event(name="exception", time_unix_nano=start + 1,
                             attributes=[_kv("exception.message", NASTY)])],
    )
    raw_resource = resource.SerializeToString()
    return [decode_stored_span(s.SerializeToString(), raw_resource, scope="shop")
            for s in (trigger, child)]


def trace_request(customer: str | float) -> ExportTraceServiceRequest:
    """The same two spans as one OTLP export, to store them as the server would."""
    spans = trace_spans(customer)
    resource = Resource(attributes=[_kv("service.name", "shop"), _kv("host.name", NASTY)])
    pb = [PbSpan.FromString(_raw(s)) for s in spans]
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=resource, scope_spans=[ScopeSpans(spans=pb)])])


def _raw(span: Span) -> bytes:
    """The serialised OTLP span of a decoded one (ids, times, status, attributes, events)."""
    pb = PbSpan(
        trace_id=bytes.fromhex(span.trace_id), span_id=bytes.fromhex(span.span_id),
        parent_span_id=bytes.fromhex(span.parent_span_id) if span.parent_span_id else b"",
        name=span.name, start_time_unix_nano=span.start_ns, end_time_unix_nano=span.end_ns,
        attributes=[_kv(k, v) for k, v in span.attributes.items()
                    if isinstance(v, str | int | float)],
        events=[PbSpan.Event(name=e.name, time_unix_nano=e.time_ns,
                             attributes=[_kv(k, v) for k, v in e.attributes.items()
                                         if isinstance(v, str | int | float)])
                for e in span.events],
    )
    if span.status.value == "error":
        pb.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message=span.status_message))
    return pb.SerializeToString()


@dataclass(frozen=True)
class Facts:
    """What the incident was told about the failure."""

    summary: str
    group_key: str


@dataclass
class Delivery:
    """What one failed run produced: the incident, the captured requests, the stored rows."""

    store: Store
    rule: Rule
    facts: Facts
    incident_id: int
    requests: list[httpx.Request]

    def body_to(self, url: str) -> bytes:
        [request] = [r for r in self.requests if str(r.url).startswith(url)]
        return request.content

    def outbox(self) -> list[tuple[str, str, str | None]]:
        return self.store.conn.execute(
            "SELECT target, status, last_error FROM outbox ORDER BY id").fetchall()


def fail_and_notify(tmp_path: Path, routes: dict[str, Any],
                    customer: str | float = NASTY) -> Delivery:
    """Record a failed run of the rule for a trace with ``customer`` as its group value, then
    let the Notifier deliver the "opened" transition once to the targets of ``routes``."""
    rule = write_rule(tmp_path)
    config_path = tmp_path / "outcomewatch.yaml"
    config_path.write_text(yaml.safe_dump({"external_url": "http://ow.test", "routes": routes}),
                           encoding="utf-8")
    config = load_config(config_path)
    spans = trace_spans(customer)
    failure = RunFailed(
        run_id="run-1", rule=rule.name, trace_id=TRACE, trigger=spans[0], opened_at=T0,
        closed_at=T0 + timedelta(minutes=5), reason=FailureReason.TRACE_IDLE,
        missing=tuple(e.span for e in rule.expect), first_received_ns=0,
        group=group_values(rule, spans[0]),
    )
    facts = Facts(failure_summary(rule, failure), group_key(failure.group))
    batch = VerdictBatch(
        [Judged(failure, facts.summary, verdict_detail(rule, failure),
                evidence_keys(rule, failure))],
        {rule.name: policy_of(rule, reopen_window=config.reopen_window)},
        {rule.route: config.targets_for(rule.route)})
    requests: list[httpx.Request] = []

    def receive(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200)

    store = Store(str(tmp_path / "outcomewatch.duckdb"))

    async def run() -> int | None:
        await store.append_spans(batch_from_request(trace_request(customer), received_ns=1))
        written = await store.write_verdicts_and_wait(batch)
        incident_id = written.transitions[0].incident_id if written.transitions else None
        clock = ManualClock(T0 + timedelta(minutes=6))
        async with httpx.AsyncClient(transport=httpx.MockTransport(receive)) as client:
            await Notifier(store, config, clock=clock, client=client).run_once()
        return incident_id

    try:
        incident_id = asyncio.run(run())
    except BaseException:
        store.close()
        raise
    assert incident_id is not None
    return Delivery(store, rule, facts, incident_id, requests)


@pytest.fixture
def delivered(tmp_path: Path) -> Iterator[Delivery]:
    routes = {"pager": {"alertmanager": {"url": AM_URL}, "webhook": {"url": HOOK_URL}}}
    delivery = fail_and_notify(tmp_path, routes)
    yield delivery
    delivery.store.close()


def with_template(tmp_path: Path, template: str, customer: str | float = NASTY,
                  content_type: str = "application/json") -> Delivery:
    hook = {"url": HOOK_URL, "template": template, "content_type": content_type}
    return fail_and_notify(tmp_path, {"pager": {"webhook": hook}}, customer)


# --- the values as the server computes them carry the strings -------------------------------


def test_the_nasty_strings_reach_the_incident_unchanged(delivered: Delivery) -> None:
    assert delivered.rule.description == RULE_TEXT
    assert 'email "sent" </script>{{ 7*7 }}' in delivered.facts.summary
    assert json.loads(delivered.facts.group_key) == {"customer.id": NASTY}


# --- Alertmanager and the default webhook body -------------------------------------------------


def test_the_alertmanager_alert_is_valid_json_with_the_exact_strings(delivered: Delivery) -> None:
    [alert] = strict_json(delivered.body_to(AM_URL))
    assert alert["annotations"]["summary"] == delivered.facts.summary
    assert alert["annotations"]["description"] == RULE_TEXT
    assert alert["labels"]["customer_id"] == NASTY
    assert alert["labels"]["rule"] == "checkout-receipt"


def test_the_default_webhook_body_is_valid_json_with_the_exact_strings(
    delivered: Delivery,
) -> None:
    body = strict_json(delivered.body_to(HOOK_URL))
    [alert] = body["alerts"]
    for notes in (body["commonAnnotations"], alert["annotations"]):
        assert notes["summary"] == delivered.facts.summary
        assert notes["description"] == RULE_TEXT
    assert body["commonLabels"]["customer_id"] == alert["labels"]["customer_id"] == NASTY
    assert body["groupLabels"] == {"rule": "checkout-receipt", "customer_id": NASTY}
    assert body["outcomewatch"]["group"] == {"customer.id": NASTY}
    assert body["outcomewatch"]["summary"] == delivered.facts.summary
    assert delivered.outbox() == [("alertmanager", "sent", None), ("webhook", "sent", None)]


@pytest.mark.parametrize("name", list(PIECES))
def test_each_piece_is_escaped_on_its_own(tmp_path: Path, name: str) -> None:
    """One value per piece, so a piece cannot hide behind another's escaping."""
    routes = {"pager": {"alertmanager": {"url": AM_URL}, "webhook": {"url": HOOK_URL}}}
    delivery = fail_and_notify(tmp_path, routes, customer=PIECES[name])
    try:
        [alert] = strict_json(delivery.body_to(AM_URL))
        assert alert["labels"]["customer_id"] == PIECES[name]
        hook = strict_json(delivery.body_to(HOOK_URL))
        assert hook["outcomewatch"]["group"] == {"customer.id": PIECES[name]}
    finally:
        delivery.store.close()


# --- webhook templates -----------------------------------------------------------------------


def test_a_tojson_template_yields_valid_json_with_the_exact_strings(tmp_path: Path) -> None:
    delivery = with_template(tmp_path, JSON_TEMPLATE)
    try:
        body = strict_json(delivery.body_to(HOOK_URL))
        assert body == {
            "summary": delivery.facts.summary, "description": RULE_TEXT, "customer": NASTY,
            "group": {"customer.id": NASTY}, "transition": "opened",
            "url": f"http://ow.test/api/v1/incidents/{delivery.incident_id}",
        }
        # tojson here is JSON, not Jinja's HTML-safe variant: no \u003c in a text body.
        assert "</script>" in delivery.body_to(HOOK_URL).decode()
    finally:
        delivery.store.close()


def test_a_jinja_expression_inside_a_value_is_data_not_a_template(tmp_path: Path) -> None:
    """The value ``{{ 7*7 }}`` (and a for-loop) comes out verbatim, even printed raw."""
    template = 'customer={{ incident.group["customer.id"] }}'
    delivery = with_template(tmp_path, template, content_type="text/plain")
    try:
        text = delivery.body_to(HOOK_URL).decode("utf-8")
        assert text == f"customer={NASTY}"
        assert "{{ 7*7 }}" in text
        assert "49" not in text
        assert "012" not in text
    finally:
        delivery.store.close()


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ incident.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ transition.__class__.__dict__ }}",
    "{{ (1).__class__.__subclasses__() }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('{marker}') }}",
    "{{ namespace.__init__.__globals__.os.system('touch {marker}') }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_a_template_cannot_leave_the_sandbox_and_its_row_fails_with_a_template_error(
    tmp_path: Path, template: str
) -> None:
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    delivery = with_template(tmp_path, template.replace("touch {marker}", command)
                             .replace("{marker}", command))
    try:
        [(target, status, error)] = delivery.outbox()
        assert (target, status) == ("webhook", "failed")
        assert error is not None
        assert error.startswith("template error: SecurityError: "), error
        assert delivery.requests == []  # nothing was sent
        assert not marker.exists()  # nothing was run
    finally:
        delivery.store.close()


@pytest.mark.parametrize(
    "template",
    ["{{ ''.__class__ }}", "{{ incident.__class__ }}", "{{ url.__doc__ }}",
     "{{ transition._private }}", "{{ url.format.__globals__ }}",
     "{{ incident.items.__self__.__class__ }}", "{{ incident.__dict__ }}"],
)
def test_an_unsafe_attribute_printed_alone_renders_as_nothing(
    tmp_path: Path, template: str
) -> None:
    """The sandbox answers an unsafe attribute with an undefined value: printed, it is an empty
    string (used any further, it raises, as above); the object behind it never shows."""
    delivery = with_template(tmp_path, template, content_type="text/plain")
    try:
        assert delivery.body_to(HOOK_URL) == b""
        assert delivery.outbox() == [("webhook", "sent", None)]
    finally:
        delivery.store.close()


# --- NaN and Infinity: valid in Python's json, not in JSON ------------------------------------


@pytest.mark.parametrize(("value", "label"), [(math.nan, "NaN"), (math.inf, "Infinity")])
def test_a_non_finite_group_value_gives_a_valid_alertmanager_alert(
    tmp_path: Path, value: float, label: str
) -> None:
    delivery = fail_and_notify(tmp_path, {"pager": {"alertmanager": {"url": AM_URL}}}, value)
    try:
        [alert] = strict_json(delivery.body_to(AM_URL))
        assert alert["labels"]["customer_id"] == label
    finally:
        delivery.store.close()


@pytest.mark.parametrize("template", [None, JSON_TEMPLATE])
@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_a_non_finite_group_value_gives_a_valid_webhook_body(
    tmp_path: Path, value: float, template: str | None
) -> None:
    hook = {"url": HOOK_URL} | ({"template": template} if template else {})
    delivery = fail_and_notify(tmp_path, {"pager": {"webhook": hook}}, value)
    try:
        strict_json(delivery.body_to(HOOK_URL))
    finally:
        delivery.store.close()


def test_the_api_answers_valid_json_for_the_same_incident(delivered: Delivery) -> None:
    """The incident and its failure detail (evidence, trigger, error spans) over HTTP."""
    client = TestClient(create_app(Reader(delivered.store.conn)))
    response = client.get(f"/api/v1/incidents/{delivered.incident_id}")
    assert response.status_code == 200
    body = strict_json(response.content)
    assert (body["summary"], body["description"], body["group"]) == (
        delivered.facts.summary, RULE_TEXT, {"customer.id": NASTY})
    [failure] = body["failures"]
    assert failure["evidence"] == {"customer.id": NASTY, EVIDENCE_KEY: NASTY, "amount": 4200}
    assert failure["trigger"]["attributes"]["retry.context"] == NASTY
    assert failure["resource"]["host.name"] == NASTY
    [error_span] = failure["error_spans"]
    assert error_span["status_message"] == NASTY
    assert error_span["exceptions"][0]["message"] == NASTY


def test_the_api_answers_valid_json_for_non_finite_values(tmp_path: Path) -> None:
    conn = duckdb.connect(str(tmp_path / "api.duckdb"))
    try:
        conn.execute(DDL)
        conn.execute(
            "INSERT INTO incidents (id, rule, status, severity, owner, route, opened_at,"
            " last_failure_at, failure_count, summary, group_key) VALUES (1, 'r', 'open',"
            " 'critical', 'o', 'p', ?, ?, 1, 's', '{\"x\": NaN, \"y\": -Infinity}')", [T0, T0])
        conn.execute(
            "INSERT INTO incident_failures (incident_id, run_id, rule, trace_id, failed_at,"
            " reason, missing, detail) VALUES (1, 'run', 'r', ?, ?, 'deadline', [],"
            " '{\"evidence\": {\"x\": NaN}, \"duration_ms\": Infinity}')", [TRACE, T0])
        response = TestClient(create_app(Reader(conn))).get("/api/v1/incidents/1")
        body = strict_json(response.content)
        assert body["group"] == {"x": None, "y": None}
        assert (body["failures"][0]["evidence"], body["failures"][0]["duration_ms"]) == (
            {"x": None}, None)
    finally:
        conn.close()


# --- SQL: rule= filters are literal --------------------------------------------------------------

# Rule names that differ only by SQL and LIKE metacharacters.
RULE_NAMES = [
    "abc", "a_c", "a%c", "a%", "a\\_c", "a\\%c", "A_C", "a", "ab",
    "a' OR 1=1 --", "' OR '1'='1", "a'; DROP TABLE runs; --", 'a" OR "1"="1', "a[bc]", "a*",
]
PROBES = ["_", "%", "a_", "a%%", "_bc", "%c", "a__", "' OR 1=1 --", "x' OR 'x'='x", "*", "a.c",
          "ABC", "a\\", "'", "''", "a''", "\\", "a[b]c"]


@pytest.fixture
def sql_client(tmp_path: Path) -> Iterator[TestClient]:
    conn = duckdb.connect(str(tmp_path / "sql.duckdb"))
    conn.execute(DDL)
    for n, rule in enumerate(RULE_NAMES):
        at = T0 + timedelta(minutes=n)
        conn.execute(
            "INSERT INTO runs (id, rule, trace_id, trigger_span_id, status, opened_at)"
            " VALUES (?, ?, ?, ?, 'open', ?)", [f"run-{n}", rule, TRACE, TRIGGER_ID, at])
        conn.execute(
            "INSERT INTO incidents (id, rule, status, severity, owner, route, opened_at,"
            " last_failure_at, failure_count, summary) VALUES (?, ?, 'open', 'warning', 'o',"
            " 'p', ?, ?, 1, 's')", [n + 1, rule, at, at])
    yield TestClient(create_app(Reader(conn)))
    conn.close()


def listed(client: TestClient, url: str, key: str, rule: str) -> list[str]:
    response = client.get(url, params={"rule": rule, "limit": 1000})
    assert response.status_code == 200, response.text
    return [item["rule"] for item in response.json()[key]]


@pytest.mark.parametrize(("url", "key"), [("/api/v1/runs", "runs"),
                                          ("/api/v1/incidents", "incidents")])
def test_a_rule_filter_matches_exactly_its_own_name(
    sql_client: TestClient, url: str, key: str
) -> None:
    for rule in RULE_NAMES:
        assert listed(sql_client, url, key, rule) == [rule], rule


@pytest.mark.parametrize(("url", "key"), [("/api/v1/runs", "runs"),
                                          ("/api/v1/incidents", "incidents")])
def test_metacharacters_in_a_rule_filter_are_neither_wildcards_nor_sql(
    sql_client: TestClient, url: str, key: str
) -> None:
    for probe in PROBES:
        assert listed(sql_client, url, key, probe) == [], probe
    # Still every row, so no probe changed anything.
    everything = sql_client.get(url, params={"limit": 1000}).json()[key]
    assert sorted(item["rule"] for item in everything) == sorted(RULE_NAMES)
