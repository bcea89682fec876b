"""Retention: old spans of passed (or run-less) traces go after --retention, spans of incident
evidence after --evidence-retention, spans of open runs never; incidents, failures and runs stay.
Deletion runs on the writer thread in windows of a bounded number of rows. Time is injected."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from outcomewatch import otlp
from outcomewatch.clock import to_ns
from outcomewatch.store import retention
from outcomewatch.store.duckdb import Store
from tests.harness import trace_id_of
from tests.processes import inprocess_server, make_request, make_span

NOW = datetime(2030, 1, 1, tzinfo=UTC)
DAY_NS = 86_400 * 1_000_000_000
POLICY = retention.Policy(spans=timedelta(days=14), evidence=timedelta(days=90), max_rows=4)


def _batch(trace_id: str, spans: int, received_ns: int) -> otlp.SpanBatch:
    body = make_request([make_span(bytes.fromhex(trace_id), f"s{i}") for i in range(spans)])
    return otlp.batch_from_request(ExportTraceServiceRequest.FromString(body),
                                   received_ns=received_ns)


def _store_trace(store: Store, *, age_days: float, runs: tuple[str, ...] = (),
                 evidence: bool = False, spans: int = 3) -> str:
    """A trace of ``spans`` spans received ``age_days`` before NOW, with runs of these statuses
    and, if ``evidence``, a row in incident_failures."""
    trace_id = os.urandom(16).hex()
    asyncio.run(store.append_spans(_batch(trace_id, spans, to_ns(NOW) - int(age_days * DAY_NS))))

    def rows(db: duckdb.DuckDBPyConnection) -> None:
        for i, status in enumerate(runs):
            db.execute("INSERT INTO runs (id, rule, trace_id, trigger_span_id, status, opened_at)"
                       " VALUES (?, 'r', ?, '', ?, ?)", [f"{trace_id}-{i}", trace_id, status, NOW])
        if evidence:
            db.execute("INSERT INTO incident_failures (incident_id, run_id, rule, trace_id, "
                       "failed_at, reason, missing, detail) VALUES (1, ?, 'r', ?, ?, "
                       "'trace_idle', [], '{}')", [f"{trace_id}-0", trace_id, NOW])

    asyncio.run(store.run(rows))
    return trace_id


def _stored_traces(store: Store) -> dict[str, int]:
    cursor = store.conn.cursor()
    try:
        rows = cursor.execute("SELECT trace_id, count(*) FROM spans GROUP BY ALL").fetchall()
    finally:
        cursor.close()
    return {str(t): int(n) for t, n in rows}


def test_each_span_goes_after_its_own_retention_and_open_runs_keep_theirs(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "ow.duckdb"))
    try:
        kept = {
            "passed 13d ago": _store_trace(store, age_days=13, runs=("passed",)),
            "no run, 1d ago": _store_trace(store, age_days=1),
            "open run, 200d ago": _store_trace(store, age_days=200, runs=("open",)),
            "failed 30d ago": _store_trace(store, age_days=30, runs=("failed",), evidence=True),
            "passed and failed, 30d ago": _store_trace(
                store, age_days=30, runs=("passed", "failed"), evidence=True),
            "failed and open, 100d ago": _store_trace(
                store, age_days=100, runs=("failed", "open"), evidence=True),
        }
        gone = {
            "passed 15d ago": _store_trace(store, age_days=15, runs=("passed", "passed")),
            "no run, 15d ago": _store_trace(store, age_days=15),
            "failed 91d ago": _store_trace(store, age_days=91, runs=("failed",), evidence=True),
        }
        before = asyncio.run(store.run(lambda db: db.execute(
            "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM incident_failures)"
        ).fetchone()))

        deleted = asyncio.run(retention.apply(store, POLICY, now=NOW))

        stored = _stored_traces(store)
        assert {name for name, t in kept.items() if stored.get(t) == 3} == set(kept)
        assert {name for name, t in gone.items() if t in stored} == set()
        assert (deleted.spans, deleted.evidence) == (6, 3)
        after = asyncio.run(store.run(lambda db: db.execute(
            "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM incident_failures)"
        ).fetchone()))
        assert after == before  # runs and failures (the incident's own record) stay

        # Nothing more to do at the same moment; a day later the 13-day-old trace goes too.
        assert asyncio.run(retention.apply(store, POLICY, now=NOW)).total == 0
        later = asyncio.run(retention.apply(store, POLICY, now=NOW + timedelta(days=1, hours=1)))
        assert later.spans == 3
        assert kept["passed 13d ago"] not in _stored_traces(store)
    finally:
        store.close()


def test_deletes_in_windows_of_at_most_max_rows(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "ow.duckdb"))
    try:
        base = to_ns(NOW) - 20 * DAY_NS
        for i in range(60):  # 60 exports of 5 spans, one second apart
            trace_id = os.urandom(16).hex()
            asyncio.run(store.append_spans(_batch(trace_id, 5, base + i * 1_000_000_000)))
        big = os.urandom(16).hex()  # one export of 30 spans: more than max_rows share one ns
        asyncio.run(store.append_spans(_batch(big, 30, base + 3_600 * 1_000_000_000)))

        end = to_ns(NOW) - 14 * DAY_NS
        window = asyncio.run(store.run(lambda db: retention.delete_window(
            db, lo=base, width=1 << 60, end=end, spans_cut=end, evidence_cut=None,
            max_rows=12)))
        assert isinstance(window, retention._Window)
        assert 0 < window.looked_at <= 12
        assert window.spans == window.looked_at  # all expired, none kept

        policy = retention.Policy(spans=timedelta(days=14), evidence=None, max_rows=12)
        deleted = asyncio.run(retention.apply(store, policy, now=NOW))
        assert deleted.spans == 300 + 30 - window.spans
        assert deleted.windows >= (300 - 12) // 12
        assert _stored_traces(store) == {}
    finally:
        store.close()


def test_the_server_deletes_on_its_interval_and_keeps_incident_evidence(tmp_path: Path) -> None:
    with inprocess_server(tmp_path, retention_interval=timedelta(milliseconds=50)) as running:
        tracer = running.tracer("grpc", **{"service.name": "accounts"})
        with (tracer.start_as_current_span("signup.completed") as passing,
              tracer.start_as_current_span("welcome.sent")):
            pass
        with tracer.start_as_current_span("signup.completed") as failing:
            pass
        passed, failed = trace_id_of(passing), trace_id_of(failing)
        assert running.verdict(passed, "signup-welcomed")["status"] == "passed"
        running.go_idle()
        assert running.verdict(failed, "signup-welcomed")["status"] == "failed"
        incident = running.get("/api/v1/incidents")["incidents"][0]

        def stored(trace_id: str) -> bool:
            return running.api.get(f"/api/v1/traces/{trace_id}").status_code == 200

        assert stored(passed) and stored(failed)
        running.advance(timedelta(days=15))
        running.wait_for(lambda: not stored(passed), what="retention of the passed trace")
        assert stored(failed)
        running.advance(timedelta(days=76))
        running.wait_for(lambda: not stored(failed), what="retention of the evidence")

        detail = running.get(f"/api/v1/incidents/{incident['id']}")
        assert detail["failure_count"] == 1
        assert [f["trace_id"] for f in detail["failures"]] == [failed]
        assert [r["status"] for r in running.runs(trace_id=passed)] == ["passed"]
        def counted() -> str | None:  # once the retention round that deleted them finished
            text = running.api.get("/metrics").text
            return text if 'outcomewatch_spans_deleted_total{kind="evidence"} 1.0' in text else None

        metrics = running.wait_for(counted, what="the deleted spans counted")
        assert 'outcomewatch_spans_deleted_total{kind="passed"} 2.0' in metrics
