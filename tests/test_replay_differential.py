"""Differential: replaying stored spans decides exactly what the streaming engine decided live.

Hypothesis (derandomized: the same examples on every run) generates random traces, each telling
one rule's story imperfectly: outcomes left out, statuses flipped, attributes changed so that
``where`` fails, outcomes in another trace (linked or not), re-sent spans, noise (with names only
a wrongly escaped LIKE would match), and arrival times that mix traces in one request and leave
gaps longer than the idle time. The same requests go (1) through the streaming engine as the
server feeds it: in arrival order, the clock at each arrival, ticking on a 500 ms grid; and (2)
into a real DuckDB file through the real Store, then through ``replay``. Every run must get the
same verdict (run id, status, missing, reason).
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from outcomewatch.analyzer.engine import Engine
from outcomewatch.clock import ManualClock
from outcomewatch.model import RunFailed, RunOpened, RunPassed
from outcomewatch.offline.replay import replay
from outcomewatch.otlp import SpanBatch, batch_from_request
from outcomewatch.rules import RuleSet, load_rules
from outcomewatch.store.duckdb import Store

ROOT = Path(__file__).resolve().parent.parent
IDLE = timedelta(seconds=10)
STEP = timedelta(milliseconds=500)
S = 10**9
# A minute before 03:00 Helsinki (01:00 UTC): the nightly-backup slot falls inside the data.
START = datetime(2026, 11, 24, 0, 58, tzinfo=UTC)
START_NS = int(START.timestamp()) * S
SPREAD_S = 30 * 60  # traces start within 30 minutes
END_S = 45 * 60  # a last request then: the data covers the slot's 30 minutes of grace
TRACES_PER_EXAMPLE = 45
EXAMPLES = 10  # 450 traces in all, and as many more for outcomes sent elsewhere

TRICKY_RULES = """
rules:
  - name: tricky-globs
    trigger: {span: "job_1", service: "shop-?"}
    expect:
      - {span: "job%done", status: error}
      - {span: "pay_[!x]%", status: unset}
      - {span: "ship[0-9]", service: "*ware*", duration: {lt: 2s}}
  - name: idle-without-within
    trigger: {span: "order.*", where: {k: {in: [1, 2]}}}
    expect: [{span: "pay_*", status: ok}]
"""
# Stories: the spans one rule wants (name, service, status, attributes), trigger first. A trace
# tells one story, imperfectly: spans left out, statuses flipped, attributes changed, late
# arrivals, outcomes in a trace of their own (linked or not), plus noise.
STORIES: list[list[tuple[str, str, int, dict[str, Any]]]] = [
    [("stripe.webhook", "billing", 1, {"event.type": "invoice.payment_failed"}),
     ("entitlement.updated", "test", 1, {}),
     ("email.delivered", "test", 0, {"email.template": "dunning"})],
    [("report.generate", "test", 1, {"report.schedule": "daily", "report.delivery": "email"}),
     ("email.send", "test", 2, {}), ("email.delivered", "test", 1, {})],
    [("batch.process", "test", 1, {"batch.size": 5}), ("result.validated", "test", 1, {}),
     ("result.persisted", "test", 1, {}), ("result.published", "test", 1, {})],
    [("queue.consume", "test", 1, {"task.type": "crm.contact_update"}),
     ("external.update", "test", 1, {"http.response.status_code": 200}),
     ("state.reconciled", "test", 1, {})],
    [("backup.run", "test", 1, {"backup.kind": "nightly"}), ("backup.upload", "test", 1, {}),
     ("backup.decrypt_check", "test", 1, {}), ("restore.verify", "test", 1, {}),
     ("backup.verify", "test", 1, {})],
    [("billing.webhook", "billing", 1, {"event.type": "customer.subscription.created",
                                        "subscription.id": "sub_1"}),
     ("provisioning.job", "test", 1, {"subscription.id": "sub_1"}),
     ("tenant.ready", "test", 1, {"subscription.id": "sub_1"})],
    [("billing.webhook", "billing", 1, {"event.type": "customer.subscription.created"}),
     ("provisioning.job", "test", 1, {}), ("tenant.ready", "test", 1, {})],
    [("checkout.submit", "test", 1, {}), ("payment.charge", "test", 1, {}),
     ("payment.charge", "test", 1, {}), ("receipt.sent", "test", 1, {})],
    [("export.request", "test", 0, {"customer.id": "c1"}), ("export.delivered", "test", 1, {})],
    [("job_1", "shop-1", 0, {}), ("job%done", "test", 2, {}), ("pay_y%", "test", 0, {}),
     ("ship5", "warehouse", 0, {})],
    [("order.a", "test", 0, {"k": 1}), ("pay_ok", "test", 1, {})],
]
NOISE_NAMES = ["db.query", "http.get", "cache.miss", "jobX1", "job1done", "payXy%", "shipX",
               "pay_x%", "email.send", "payment.charge"]
SERVICES = ["shop-1", "shop-12", "warehouse", "billing", "test"]
ATTRIBUTES: dict[str, list[Any]] = {
    "event.type": ["invoice.payment_failed", "customer.subscription.created", "invoice.paid"],
    "email.template": ["dunning", "payment_failed", "welcome"],
    "report.schedule": ["daily"],
    "report.delivery": ["email", "sftp"],
    "batch.size": [0, 5],
    "task.type": ["crm.contact_update", "billing.x"],
    "http.response.status_code": [200, 422],
    "subscription.id": ["sub_1", "sub_2"],
    "customer.id": ["c1", "c2"],
    "backup.kind": ["nightly", "adhoc"],
    "k": [1, 2, "1", 3],
}
DURATIONS_MS = [1, 500, 1_500, 5_000, 15_000]
DELAYS_S = [0, 0, 0, 0.5, 1, 2, 5, 9, 12, 25]


def pick(draw: st.DrawFn, choices: list[Any]) -> Any:
    # Integers strategies are cached by Hypothesis; a sampled_from built per draw is not.
    return choices[draw(st.integers(0, len(choices) - 1))]


def one_in(draw: st.DrawFn, n: int) -> bool:
    return draw(st.integers(0, n - 1)) == 0


ATTRIBUTE_KEYS = sorted(ATTRIBUTES)
OFFSETS_S = [0, 1, 3, 8, 20, 60, 240, 500]


def span_spec(draw: st.DrawFn, template: tuple[str, str, int, dict[str, Any]] | None,
              trace: str, start_s: int) -> dict[str, Any]:
    """One span: the story's template (possibly spoiled) or noise."""
    if template is None:
        name, service, status = pick(draw, NOISE_NAMES), pick(draw, SERVICES), pick(draw, [0, 1, 2])
        attributes = {}
        for _ in range(draw(st.integers(0, 2))):
            key = pick(draw, ATTRIBUTE_KEYS)
            attributes[key] = pick(draw, ATTRIBUTES[key])
    else:
        name, service, status = template[0], template[1], template[2]
        attributes = {**template[3]}
        if one_in(draw, 7):
            status = pick(draw, [0, 1, 2])
        if one_in(draw, 7):
            key = pick(draw, ATTRIBUTE_KEYS)
            attributes[key] = pick(draw, ATTRIBUTES[key])
    return {"trace": trace, "name": name, "service": service, "status": status,
            "attributes": attributes, "start_s": start_s,
            "duration_ms": pick(draw, DURATIONS_MS), "delay_s": pick(draw, DELAYS_S),
            "link": None, "resent": one_in(draw, 16)}


@st.composite
def trace_specs(draw: st.DrawFn, i: int) -> tuple[int, list[dict[str, Any]]]:
    """A trace's start (seconds into the data) and its spans; some outcomes may sit in a second
    trace of their own, linked to the first or not."""
    base_s = draw(st.integers(0, SPREAD_S))
    story = pick(draw, STORIES)
    own, other = f"trace {i}", f"trace {i} job"
    specs = []
    offset = 0
    for k, template in enumerate(story):
        if k and one_in(draw, 5):
            continue  # an outcome that never happens
        offset += pick(draw, OFFSETS_S)
        trace = other if k and one_in(draw, 4) else own
        specs.append(span_spec(draw, template, trace, offset))
    for _ in range(draw(st.integers(0, 3))):
        specs.append(span_spec(draw, None, pick(draw, [own, other]), draw(st.integers(0, 90))))
    if one_in(draw, 3):  # a busy trace: a span no rule names every 6 s for a while
        for start_s in range(0, pick(draw, [30, 90, 300]), 6):
            specs.append({"trace": own, "name": "db.query", "service": "test", "status": 0,
                          "attributes": {}, "start_s": start_s, "duration_ms": 1,
                          "delay_s": 0, "link": None, "resent": False})
    if draw(st.booleans()):
        # The other trace links to this one, on a span no rule names (a queue consumer's).
        link = span_spec(draw, None, other, draw(st.integers(0, 600)))
        specs.append({**link, "name": "queue.receive", "link": own})
    return base_s, specs


traces = st.tuples(*[trace_specs(i) for i in range(TRACES_PER_EXAMPLE)])


def _id(size: int, text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()[:size]


def _pb_span(i: int, j: int, base_s: int, spec: dict[str, Any]) -> Span:
    start = START_NS + (base_s + spec["start_s"]) * S
    pb_span = Span(trace_id=_id(16, spec["trace"]), span_id=_id(8, f"span {i}.{j}"),
                   name=spec["name"], start_time_unix_nano=start,
                   end_time_unix_nano=start + spec["duration_ms"] * 10**6,
                   status=Status(code=spec["status"]))
    for key, value in spec["attributes"].items():
        attribute = pb_span.attributes.add(key=key)
        if isinstance(value, int):
            attribute.value.int_value = value
        else:
            attribute.value.string_value = value
    if spec["link"] is not None and spec["link"] != spec["trace"]:
        pb_span.links.add(trace_id=_id(16, spec["link"]), span_id=_id(8, "any"))
    return pb_span


def requests(generated: tuple[tuple[int, list[dict[str, Any]]], ...]) -> list[SpanBatch]:
    """Requests by arrival time (a span arrives when it ends, plus its delay, to the half
    second), each holding the spans of every trace that arrive then, one resource per span."""
    arrivals: dict[int, list[tuple[str, Span]]] = {}
    for i, (base_s, specs) in enumerate(generated):
        for j, spec in enumerate(specs):
            pb_span = _pb_span(i, j, base_s, spec)
            end_s = base_s + spec["start_s"] + spec["duration_ms"] / 1000
            at = int((end_s + spec["delay_s"]) * 2)  # half seconds
            arrivals.setdefault(at, []).append((spec["service"], pb_span))
            if spec["resent"]:  # a retried export: the same span again, 3 s later
                arrivals.setdefault(at + 6, []).append((spec["service"], pb_span))
    arrivals.setdefault(END_S * 2, []).append(("test", Span(
        trace_id=_id(16, "end"), span_id=_id(8, "end"), name="end",
        start_time_unix_nano=START_NS + END_S * S, end_time_unix_nano=START_NS + END_S * S)))
    batches = []
    for at in sorted(arrivals):
        request = ExportTraceServiceRequest()
        for service, pb_span in arrivals[at]:
            resource_spans = ResourceSpans(scope_spans=[ScopeSpans(spans=[pb_span])])
            resource_spans.resource.attributes.add(key="service.name",
                                                   value={"string_value": service})
            request.resource_spans.append(resource_spans)
        batches.append(batch_from_request(request, received_ns=START_NS + at * S // 2))
    return batches


Verdict = tuple[str, str, tuple[str, ...], str | None]


def streamed(rules: RuleSet, batches: list[SpanBatch]) -> dict[str, Verdict]:
    """The server's way: the engine observes each request at its arrival; ticks every STEP."""
    clock = ManualClock(START + timedelta(microseconds=(batches[0].received_ns - START_NS)
                                          // 1000))
    engine = Engine(rules, idle=IDLE, clock=clock)
    runs: dict[str, Verdict] = {}

    def record(events: list[Any]) -> None:
        for event in events:
            if isinstance(event, RunOpened):
                runs.setdefault(event.run_id, (event.rule, "open", (), None))
            elif isinstance(event, RunPassed):
                runs[event.run_id] = (event.rule, "passed", (), None)
            elif isinstance(event, RunFailed):
                runs[event.run_id] = (event.rule, "failed", tuple(event.missing),
                                      event.reason.value)

    def advance_to(ns: int) -> None:
        target = START + timedelta(microseconds=(ns - START_NS) // 1000)
        while clock() < target:
            clock.advance(min(STEP, target - clock()))
            record(engine.tick())

    for batch in batches:
        advance_to(batch.received_ns)
        record(engine.tick())
        record(engine.observe(batch))
    advance_to(batches[-1].received_ns + int(2.5 * 3600 * S))  # past every deadline
    return runs


def stored_and_replayed(rules: RuleSet, batches: list[SpanBatch], db: Path) -> dict[str, Verdict]:
    async def write() -> None:
        store = Store(str(db))
        try:
            # Concurrent appends, as concurrent exports: the writer commits them in groups,
            # in the order submitted.
            await asyncio.gather(*(store.append_spans(batch) for batch in batches))
        finally:
            store.close()

    asyncio.run(write())
    report = replay(rules, str(db), idle=IDLE)
    assert report.stats.candidate_spans < report.stats.window_spans
    return {r.run_id: (r.rule, r.status.value, tuple(r.missing),
                       r.reason.value if r.reason is not None else None) for r in report.runs}


@settings(derandomize=True, max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@given(traces)
def test_replay_of_stored_spans_matches_the_streaming_engine(
    generated: tuple[tuple[int, list[dict[str, Any]]], ...],
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "tricky.yaml").write_text(TRICKY_RULES)
        rules = load_rules([ROOT / "rules" / "examples", Path(scratch) / "tricky.yaml"])
        batches = requests(generated)
        live = streamed(rules, batches)
        assert live, "the generated traces should open some runs"
        assert all(status != "open" for _, status, _, _ in live.values())
        assert stored_and_replayed(rules, batches, Path(scratch) / "spans.duckdb") == live
