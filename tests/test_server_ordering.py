"""The pipeline persists the engine's verdicts in the engine's order, with a real Store on a real
DuckDB file and an injected clock (no sockets: Pipeline.ingest and Pipeline.tick are driven
here). Regression tests for orderings a review found broken: a pass overtaking an earlier
failure, a late outcome after its failure, a failure of a rule that a reload removed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from outcomewatch.clock import ManualClock, to_ns
from outcomewatch.otlp import SpanBatch, batch_from_request
from outcomewatch.pipeline import Pipeline
from outcomewatch.server import Server, Settings
from outcomewatch.store.duckdb import Store
from outcomewatch.store.queries import Reader

IDLE = timedelta(seconds=10)


def spans(clock: ManualClock, *items: tuple[int, int, str]) -> SpanBatch:
    """(trace number, span number, name) spans, status OK, ending now."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.add(key="service.name").value.string_value = "svc"
    scope = resource_spans.scope_spans.add()
    now = to_ns(clock())
    for trace, span, name in items:
        pb_span = scope.spans.add(name=name, trace_id=trace.to_bytes(16, "big"),
                                  span_id=span.to_bytes(8, "big"))
        pb_span.start_time_unix_nano, pb_span.end_time_unix_nano = now - 1000, now
        pb_span.status.code = pb_span.status.STATUS_CODE_OK
    return batch_from_request(request, received_ns=now)


class Harness:
    def __init__(self, tmp_path: Path, rules: str, clock: ManualClock | None = None) -> None:
        self.rules = tmp_path / "rules.yaml"
        self.rules.write_text(rules)
        self.clock = clock or ManualClock()
        self.closed = False
        self.loop = asyncio.new_event_loop()
        self.server = Server(Settings(rules=(str(self.rules),), db=str(tmp_path / "ow.duckdb"),
                                      trace_idle=IDLE), clock=self.clock)
        self.server.store = Store(self.server.settings.db)
        self.server.engine = self.server._new_engine({})
        self.pipeline = Pipeline(self.server.engine, self.server.store,
                                 rules=lambda: self.server.rules, notify=self.server.notify,
                                 metrics=self.server.metrics, clock=self.clock)

    def ingest(self, *items: tuple[int, int, str]) -> None:
        self.loop.run_until_complete(self.pipeline.ingest(spans(self.clock, *items)))

    def tick_after(self, delta: timedelta) -> None:
        self.clock.advance(delta)
        self.pipeline.tick()

    def settle(self) -> None:
        assert self.server.store is not None
        self.pipeline.flush()
        # The writer is FIFO: work queued after everything else is a barrier.
        self.loop.run_until_complete(self.server.store.run(lambda db: None))

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        assert self.server.store is not None
        cursor = self.server.store.conn.cursor()
        try:
            return cursor.execute(sql).fetchall()
        finally:
            cursor.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        assert self.server.store is not None
        self.server.store.close()
        self.loop.close()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    made: list[Harness] = []

    def factory(rules: str) -> Harness:
        made.append(Harness(tmp_path, rules))
        return made[-1]

    yield factory
    for harness in made:
        harness.close()


CHARGE_ONCE = """
rules:
  - name: charge-once
    owner: billing
    trigger: {span: order.placed}
    expect: [{span: charge.done, count: {gte: 1, lte: 1}}]
    resolve_after: 1
"""


def test_a_pass_decided_after_a_failure_in_the_same_tick_is_stored_after_it(make: Any) -> None:
    h = make(CHARGE_ONCE)
    h.ingest((1, 1, "order.placed"))
    h.tick_after(IDLE + timedelta(seconds=1))  # fails: an incident opens
    h.settle()
    h.ingest((2, 1, "order.placed"))  # will fail...
    h.ingest((3, 1, "order.placed"), (3, 2, "charge.done"))  # ...and this pass, in one tick
    h.tick_after(IDLE + timedelta(seconds=1))
    h.settle()

    assert h.rows("SELECT status, failure_count FROM incidents") == [("resolved", 2)]
    assert [r[0] for r in h.rows(
        "SELECT kind FROM incident_events ORDER BY occurred_at, kind")] == ["opened", "resolved"]


ORDER_CONFIRMED = """
rules:
  - name: order-confirmed
    owner: shop
    trigger: {span: order.placed}
    expect: [{span: email.sent}]
"""


def test_a_late_outcome_is_kept_and_is_not_evidence_of_the_failure(make: Any) -> None:
    h = make(ORDER_CONFIRMED)
    h.ingest((1, 1, "order.placed"))
    h.tick_after(IDLE + timedelta(seconds=1))
    h.clock.advance(timedelta(seconds=1))
    h.ingest((1, 2, "email.sent"))  # after the verdict
    h.settle()

    assert h.rows("SELECT status, late_outcomes FROM runs") == [("failed", ["email.sent"])]
    assert h.rows("SELECT count(*) FROM incident_events WHERE kind = 'late_outcome'") == [(1,)]
    # The incident file is built from the spans received up to the verdict.
    assert h.server.store is not None
    detail = Reader(h.server.store.conn).get_incident(1)
    assert detail is not None
    [failure] = detail.failures
    assert failure.detail["span_count"] == 1
    assert failure.detail["trigger"]["name"] == "order.placed"


def test_a_run_of_a_rule_removed_by_a_reload_still_gets_its_verdict(make: Any) -> None:
    h = make(ORDER_CONFIRMED)
    h.ingest((1, 1, "order.placed"))
    h.rules.write_text(ORDER_CONFIRMED.replace("order-confirmed", "order-mailed"))
    h.loop.run_until_complete(h.server.reload())
    h.tick_after(IDLE + timedelta(seconds=1))
    h.settle()

    assert h.rows("SELECT rule, status FROM runs") == [("order-confirmed", "failed")]
    assert h.rows("SELECT rule, failure_count FROM incidents") == [("order-confirmed", 1)]


HELD_AN_HOUR = """
rules:
  - name: settled-within-an-hour
    owner: billing
    trigger: {span: order.placed}
    expect: [{span: charge.done}]
    within: 1h
"""


def test_a_restart_reads_back_past_the_idle_time_only_the_spans_a_rule_looks_at(
    make: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    first = make(HELD_AN_HOUR)
    first.ingest((1, 1, "order.placed"), (4, 1, "charge.done"),
                 *[(100 + n, 1, "db.query") for n in range(50)])
    # Every trace is idle now; trace 1's run stays open and trace 4's outcome is held (1h).
    first.tick_after(IDLE * 3)
    first.ingest((2, 1, "charge.done"), (3, 1, "db.query"))  # the last idle window
    first.settle()
    first.close()

    second = Harness(tmp_path, HELD_AN_HOUR, first.clock)
    try:
        with caplog.at_level("INFO", logger="outcomewatch.pipeline"):
            second.loop.run_until_complete(second.pipeline.recover(IDLE))
        # Trace 1 (an open run), trace 4's outcome (a rule looks at it) and the two spans of
        # the last idle window; none of the 50 others.
        assert "recovered 4 spans" in caplog.text
        assert second.server.engine.open_runs == 1
        second.ingest((1, 2, "charge.done"))
        second.tick_after(IDLE * 2)
        second.settle()
        assert second.rows("SELECT trace_id, status FROM runs") == [
            ((1).to_bytes(16, "big").hex(), "passed")]
    finally:
        second.close()
