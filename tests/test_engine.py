"""The engine on its own: real compiled rules and real OTLP batches, a clock the test moves."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from outcomewatch.analyzer.engine import Engine
from outcomewatch.clock import ManualClock
from outcomewatch.model import FailureReason, RunFailed, RunOpened, RunPassed
from outcomewatch.otlp import SpanBatch, batch_from_request
from outcomewatch.rules import load_rules

IDLE = timedelta(seconds=10)
RULES = """
rules:
  - name: order-confirmed
    owner: shop
    trigger: {span: order.placed, where: {order.kind: online}}
    expect:
      - {span: payment.captured, status: ok}
      - {span: "email.*"}
  - name: export-ready
    trigger: {span: export.requested}
    expect: [{span: export.uploaded}]
    within: 1h
"""


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def engine(tmp_path: Path, clock: ManualClock) -> Engine:
    return make_engine(tmp_path, RULES, clock)


# -- helpers, shared by the tests/test_engine_*.py files ----------------------------------


def make_engine(tmp_path: Path, rules: str, clock: ManualClock, **options: Any) -> Engine:
    """An engine over ``rules`` (YAML text), compiled by the real loader."""
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    return Engine(load_rules([path]), idle=IDLE, clock=clock, **options)


def span(
    trace: bytes,
    name: str,
    *,
    ok: bool = False,
    error: bool = False,
    start_ns: int | None = None,
    duration: timedelta = timedelta(microseconds=1),
    links: tuple[tuple[bytes, bytes], ...] = (),
    span_id: bytes | None = None,
    attrs: dict[str, Any] | None = None,
    **attributes: Any,
) -> Span:
    """A protobuf span; ``links`` are (trace id, span id) pairs; attributes from ``attrs`` (for
    keys with dots) and keyword arguments."""
    start = time.time_ns() if start_ns is None else start_ns
    code = Status.STATUS_CODE_ERROR if error else (
        Status.STATUS_CODE_OK if ok else Status.STATUS_CODE_UNSET)
    pb_span = Span(trace_id=trace, span_id=span_id or os.urandom(8), name=name,
                   start_time_unix_nano=start,
                   end_time_unix_nano=start + duration // timedelta(microseconds=1) * 1000,
                   status=Status(code=code))
    for key, value in {**(attrs or {}), **attributes}.items():
        any_value = (AnyValue(string_value=value) if isinstance(value, str)
                     else AnyValue(int_value=value))
        pb_span.attributes.append(KeyValue(key=key, value=any_value))
    for linked_trace, linked_span in links:
        pb_span.links.append(Span.Link(trace_id=linked_trace, span_id=linked_span))
    return pb_span


def batch(*spans: Span, resource: dict[str, str] | None = None) -> SpanBatch:
    pb_resource = Resource(attributes=[
        KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in (resource or {}).items()])
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=pb_resource, scope_spans=[ScopeSpans(spans=list(spans))])])
    return batch_from_request(request, received_ns=time.time_ns())


def order(trace: bytes) -> Span:
    return span(trace, "order.placed", attrs={"order.kind": "online"})


def test_a_run_passes_the_moment_its_last_outcome_arrives(engine: Engine) -> None:
    trace = os.urandom(16)
    opened = engine.observe(batch(order(trace), span(trace, "payment.captured", ok=True)))
    passed = engine.observe(batch(span(trace, "email.sent")))

    assert [type(e) for e in opened] == [RunOpened]
    assert [type(e) for e in passed] == [RunPassed]
    assert passed[0].run_id == opened[0].run_id


def test_outcomes_that_arrive_before_their_trigger_still_count(engine: Engine) -> None:
    trace = os.urandom(16)
    assert engine.observe(batch(span(trace, "payment.captured", ok=True),
                                span(trace, "email.sent"))) == []
    events = engine.observe(batch(order(trace)))

    assert [type(e) for e in events] == [RunOpened, RunPassed]


def test_it_fails_the_run_when_the_trace_goes_idle_without_the_outcome(
    engine: Engine, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    engine.observe(batch(order(trace), span(trace, "payment.captured")))  # status unset, not ok
    clock.advance(IDLE - timedelta(milliseconds=1))
    assert engine.tick() == []
    clock.advance(timedelta(milliseconds=1))

    (failed,) = engine.tick()
    assert isinstance(failed, RunFailed)
    assert failed.reason is FailureReason.TRACE_IDLE
    assert failed.missing == ("payment.captured", "email.*")
    assert engine.live_traces == 0


def test_spans_no_rule_looks_at_still_keep_a_live_trace_from_going_idle(
    engine: Engine, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    engine.observe(batch(order(trace)))
    clock.advance(IDLE - timedelta(seconds=1))
    engine.observe(batch(span(trace, "db.query")))
    clock.advance(timedelta(seconds=2))
    assert engine.tick() == []
    clock.advance(IDLE)
    assert len(engine.tick()) == 1


def test_a_trigger_whose_where_does_not_match_opens_nothing(engine: Engine) -> None:
    trace = os.urandom(16)
    events = engine.observe(batch(span(trace, "order.placed", attrs={"order.kind": "phone"})))
    assert events == []
    assert engine.live_traces == 0


def test_a_trigger_sent_twice_opens_one_run_even_after_its_verdict(
    engine: Engine, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    trigger = order(trace)
    first = engine.observe(batch(trigger))
    assert engine.observe(batch(trigger)) == []
    clock.advance(IDLE)
    assert len(engine.tick()) == 1
    assert engine.observe(batch(trigger)) == []
    assert len(first) == 1


def test_a_rule_with_within_waits_for_its_deadline_not_the_idle_time(
    engine: Engine, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "export.requested")))
    clock.advance(IDLE * 3)
    assert engine.tick() == []
    late = engine.observe(batch(span(trace, "export.uploaded")))
    assert [type(e) for e in late] == [RunPassed]


def test_a_rule_with_within_fails_with_reason_deadline(engine: Engine, clock: ManualClock) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "export.requested")))
    clock.advance(timedelta(hours=1, seconds=1))

    (failed,) = engine.tick()
    assert isinstance(failed, RunFailed)
    assert failed.reason is FailureReason.DEADLINE
    assert failed.missing == ("export.uploaded",)


def test_traces_without_any_span_a_rule_names_keep_no_state(engine: Engine) -> None:
    trace = os.urandom(16)
    assert engine.observe(batch(*(span(trace, f"step.{i}") for i in range(50)))) == []
    assert engine.live_traces == 0


def test_an_outcome_exported_long_before_its_long_running_trigger_still_counts(
    engine: Engine, clock: ManualClock
) -> None:
    # A root span that runs for 20 minutes is exported when it ends, long after its child.
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "export.uploaded")))
    clock.advance(timedelta(minutes=20))
    engine.tick()
    events = engine.observe(batch(span(trace, "export.requested")))
    assert [type(e) for e in events] == [RunOpened, RunPassed]


def test_held_outcomes_are_forgotten_after_the_longest_within(
    engine: Engine, clock: ManualClock
) -> None:
    trace = os.urandom(16)
    engine.observe(batch(span(trace, "export.uploaded")))
    clock.advance(timedelta(hours=1, seconds=1))  # the longest `within` of the rules here
    engine.tick()
    assert engine.live_traces == 0
