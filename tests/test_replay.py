"""``outcomewatch replay``: rules evaluated against spans stored by the real Store, read-only.

Each test stores OTLP batches with ``store.duckdb.Store`` (as the server does) at chosen
arrival times, replays them, and compares with what the streaming engine decides."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from outcomewatch import cli
from outcomewatch.model import RunStatus
from outcomewatch.offline.candidates import candidate_predicate, like_pattern
from outcomewatch.offline.drive import Driver, IncidentBook, Verdicts, at_ns, settle_horizon
from outcomewatch.offline.replay import replay
from outcomewatch.otlp import SpanBatch, batch_from_request
from outcomewatch.rules import RuleSet, load_rules
from outcomewatch.store.duckdb import Store

T0 = 1_790_000_000 * 10**9  # 2026-09-21, an arbitrary instant
S = 10**9
IDLE = timedelta(seconds=10)
RULES = """
rules:
  - name: order-confirmed
    trigger: {span: order.placed, service: "shop-*", where: {order.kind: online}}
    expect:
      - {span: payment.captured, status: ok}
      - {span: "email_?%"}
  - name: export-ready
    trigger: {span: export.requested}
    expect: [{span: export.uploaded}]
    within: 1h
    group_by: [customer.id]
    open_after: 2
  - name: linked-provisioning
    trigger: {span: signup, where: {event: created}}
    expect: [{span: provision, status: ok}]
    correlate: {by: account.id}
    within: 10m
"""


def rules(tmp_path: Path, text: str = RULES) -> RuleSet:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return load_rules([path])


def span(trace: bytes, name: str, *, at: int = T0, ok: bool = False, service: str = "shop-eu",
         links: tuple[bytes, ...] = (), **attributes: str) -> tuple[str, Span]:
    pb_span = Span(trace_id=trace, span_id=os.urandom(8), name=name, start_time_unix_nano=at,
                   end_time_unix_nano=at + 1000,
                   status=Status(code=Status.STATUS_CODE_OK if ok else Status.STATUS_CODE_UNSET))
    for key, value in attributes.items():
        pb_span.attributes.add(key=key.replace("_", "."), value={"string_value": value})
    for target in links:
        pb_span.links.add(trace_id=target, span_id=os.urandom(8))
    return service, pb_span


def request(*spans: tuple[str, Span]) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for service, pb_span in spans:
        resource_spans = ResourceSpans(scope_spans=[ScopeSpans(spans=[pb_span])])
        resource_spans.resource.attributes.add(key="service.name",
                                               value={"string_value": service})
        request.resource_spans.append(resource_spans)
    return request


def store_batches(db: Path, batches: list[SpanBatch]) -> None:
    async def write() -> None:
        store = Store(str(db))
        try:
            for batch in batches:
                await store.append_spans(batch)
        finally:
            store.close()

    asyncio.run(write())


def stream(rule_set: RuleSet, batches: list[SpanBatch]) -> dict[str, tuple[Any, ...]]:
    """What the server's engine decides: batches in arrival order, clock = arrival, ticking."""
    verdicts = Verdicts(IncidentBook.for_rules(rule_set))
    driver = Driver(rule_set, idle=IDLE, start=at_ns(batches[0].received_ns),
                    grid=timedelta(milliseconds=100), verdicts=verdicts)
    for batch in batches:
        driver.deliver(batch)
    driver.advance_to(at_ns(batches[-1].received_ns) + settle_horizon(rule_set, IDLE))
    return {r.run_id: (r.rule, r.status, r.missing, r.reason) for r in verdicts.runs.values()}


def replayed(rule_set: RuleSet, db: Path, **kwargs: Any) -> dict[str, tuple[Any, ...]]:
    report = replay(rule_set, str(db), idle=IDLE, **kwargs)
    return {r.run_id: (r.rule, r.status, r.missing, r.reason) for r in report.runs}


def batches_at(*timed: tuple[int, ExportTraceServiceRequest]) -> list[SpanBatch]:
    return [batch_from_request(req, received_ns=T0 + seconds * S) for seconds, req in timed]


def test_like_patterns_escape_sql_wildcards_and_widen_classes() -> None:
    assert like_pattern("email_?%") == "email\\__\\%"
    assert like_pattern("a*b") == "a%b"
    assert like_pattern("job[0-9]x") == "job_x"
    assert like_pattern("job[!]x]y") == "job_y"
    assert like_pattern("odd[bracket") == "odd[bracket"
    assert like_pattern("back\\slash") == "back\\\\slash"


def test_the_candidate_predicate_selects_what_selectors_could_match(tmp_path: Path) -> None:
    rule_set = rules(tmp_path)
    predicate, params = candidate_predicate(rule_set)
    db = duckdb.connect()
    db.execute("CREATE TABLE spans (name VARCHAR, service VARCHAR, status_code TINYINT, "
               "start_ns BIGINT, end_ns BIGINT, span BLOB)")
    rows = [("order.placed", "shop-eu", 0), ("order.placed", "billing", 0),
            ("payment.captured", "x", 1), ("payment.captured", "x", 2),
            ("email_x%", "x", 0), ("emailXx%", "x", 0), ("email_xy", "x", 0),
            ("db.query", "x", 0)]
    db.executemany("INSERT INTO spans VALUES (?, ?, ?, 0, 1, ''::BLOB)", rows)
    found = db.execute(f"SELECT name, service, status_code FROM spans WHERE {predicate}",
                       params).fetchall()
    assert found == [("order.placed", "shop-eu", 0), ("payment.captured", "x", 1),
                     ("email_x%", "x", 0)]


def test_replay_gives_the_streaming_verdicts_and_writes_nothing(tmp_path: Path) -> None:
    rule_set = rules(tmp_path)
    a, b, c = os.urandom(16), os.urandom(16), os.urandom(16)
    batches = batches_at(
        (0, request(span(a, "order.placed", order_kind="online"),
                    span(b, "order.placed", order_kind="online"), span(b, "db.query"))),
        (2, request(span(a, "payment.captured", ok=True), span(c, "export.requested",
                                                             customer_id="c1"))),
        (3, request(span(a, "email_1%"), span(b, "payment.captured"))),  # b: status not ok
    )
    db = tmp_path / "spans.duckdb"
    store_batches(db, batches)
    before = db.stat().st_mtime_ns

    expected = stream(rule_set, batches)
    assert replayed(rule_set, db) == expected
    assert sorted((v[0], v[1]) for v in expected.values()) == [
        ("export-ready", RunStatus.FAILED), ("order-confirmed", RunStatus.FAILED),
        ("order-confirmed", RunStatus.PASSED)]
    assert db.stat().st_mtime_ns == before
    assert duckdb.connect(str(db), read_only=True).execute(
        "SELECT count(*) FROM runs").fetchone() == (0,)


def test_spans_no_rule_looks_at_keep_the_trace_alive_in_replay_too(tmp_path: Path) -> None:
    rule_set = rules(tmp_path)
    trace = os.urandom(16)
    timed = [(0, request(span(trace, "order.placed", order_kind="online"),
                         span(trace, "payment.captured", ok=True)))]
    # Noise every 6 s (under the 10 s idle time), then the last outcome at 36 s.
    timed += [(t, request(span(trace, f"step.{t}"))) for t in range(6, 36, 6)]
    timed += [(36, request(span(trace, "email_a%")))]
    batches = batches_at(*timed)
    db = tmp_path / "spans.duckdb"
    store_batches(db, batches)

    expected = stream(rule_set, batches)
    assert [v[1] for v in expected.values()] == [RunStatus.PASSED]
    report = replay(rule_set, str(db), idle=IDLE)
    assert {r.run_id: r.status for r in report.runs} == {k: v[1] for k, v in expected.items()}
    assert report.stats.candidate_spans == 3  # the noise spans were never decoded
    assert report.stats.touch_rows == 5


def test_a_linked_trace_brings_its_outcomes_to_a_correlated_run(tmp_path: Path) -> None:
    rule_set = rules(tmp_path)
    trigger_trace, job_trace = os.urandom(16), os.urandom(16)
    batches = batches_at(
        (0, request(span(trigger_trace, "signup", event="created"))),
        # No account.id to correlate by: only the link (on a span no rule names) ties them.
        (5, request(span(job_trace, "queue.receive", links=(trigger_trace,)))),
        (9, request(span(job_trace, "provision", ok=True))),
    )
    db = tmp_path / "spans.duckdb"
    store_batches(db, batches)

    expected = stream(rule_set, batches)
    assert [v[1] for v in expected.values()] == [RunStatus.PASSED]
    assert replayed(rule_set, db) == expected


def test_since_leaves_older_spans_out(tmp_path: Path) -> None:
    rule_set = rules(tmp_path)
    trace = os.urandom(16)
    batches = batches_at((0, request(span(trace, "export.requested"))),
                         (100, request(span(os.urandom(16), "export.requested"))))
    db = tmp_path / "spans.duckdb"
    store_batches(db, batches)

    report = replay(rule_set, str(db), since_ns=T0 + 50 * S, idle=IDLE)
    assert (report.stats.stored_spans, report.stats.window_spans) == (2, 1)
    assert len(report.runs) == 1


def test_incidents_follow_open_after_per_group(tmp_path: Path) -> None:
    rule_set = rules(tmp_path)
    batches = batches_at(*[
        (i, request(span(os.urandom(16), "export.requested", customer_id=customer)))
        for i, customer in enumerate(["c1", "c2", "c1", "c1"])
    ])
    db = tmp_path / "spans.duckdb"
    store_batches(db, batches)

    report = replay(rule_set, str(db), idle=IDLE)
    assert [(i.group, i.failure_count) for i in report.incidents] == [({"customer.id": "c1"}, 3)]
    first, last = report.incidents[0].first_failure, report.incidents[0].last_failure
    assert first is not None and last is not None and first <= last


def test_a_missed_slot_is_reported_only_where_the_data_covers_its_grace(tmp_path: Path) -> None:
    text = """
rules:
  - name: hourly
    trigger: {span: job.start}
    expect: [{span: job.done}]
    schedule: {cron: "0 * * * *", grace: 5m}
    within: 20m
"""
    rule_set = rules(tmp_path, text)
    start = int(datetime(2026, 3, 1, 0, 50, tzinfo=UTC).timestamp()) * S
    noise = [batch_from_request(request(span(os.urandom(16), "noise", at=start + m * 60 * S)),
                                received_ns=start + m * 60 * S) for m in (0, 30, 72)]
    db = tmp_path / "spans.duckdb"
    store_batches(db, noise)

    report = replay(rule_set, str(db), idle=IDLE)
    # Slots 01:00 and 02:00 fall in the data (00:50 .. 02:02); only 01:00's grace is covered.
    assert [(r.reason, r.opened_at.hour) for r in report.runs] == [("missed", 1)]


def test_cli_replay_prints_json_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    db = tmp_path / "spans.duckdb"
    store_batches(db, batches_at((0, request(span(os.urandom(16), "export.requested",
                                                  customer_id="c9")))))

    args = ["replay", "--rules", str(tmp_path / "rules.yaml"), "--db", str(db)]
    assert cli.main([*args, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_rule = {r["rule"]: r for r in report["rules"]}
    assert by_rule["export-ready"] == {"rule": "export-ready", "passed": 0, "failed": 1,
                                       "open": 0, "reasons": {"deadline": 1}}
    assert report["incidents"] == []  # open_after: 2
    assert report["stats"]["candidate_spans"] == 1

    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "export-ready" in text and "1 stored spans" in text


def test_cli_replay_reports_a_database_it_cannot_open(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    code = cli.main(["replay", "--rules", str(tmp_path / "rules.yaml"), "--db",
                     str(tmp_path / "missing.duckdb")])
    assert code == 1
    assert "no database file" in capsys.readouterr().err
