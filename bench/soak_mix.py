"""The traffic mixes of bench/soak.py: what one export holds, the rules it is judged by, and the
verdict every trigger trace must end with.

Contract: ``Mix.build()`` returns a new :class:`Export` whose traces were never sent before (a
re-sent trace would be de-duplicated and open no run); soak.py calls it under its ledger's lock,
so a mix may keep state from one export to the next. ``Mix.rules`` is the rules file's text (its
routes are in :data:`CONFIG`); ``Mix.expected`` maps each rule to the status every trigger
trace's one run of that rule must end with (None: any closed status). No rule of either mix has
``open_after``, so every failed run must be counted in an incident.

- ``signup`` (the default, the soak's original traffic): per export, a trace that passes, a
  broken trace that fails, the trigger of a trace whose outcome comes in the next export (it
  passes or, when a kill delays that export past ``--trace-idle``, fails), filler spans;
- ``heavy`` (bench/bench_verdicts.py's rule-heavy mix, bench/rules/verdicts.yaml): ``traces``
  traces of 10 spans per export, each opening two runs on one trigger, bench-heavy-pass passes,
  bench-heavy-fail fails when the trace goes idle.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench_verdicts import HEAVY
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from otlp_load import SPANS_PER_TRACE, workload

SIGNUP_RULES = """
rules:
  - name: signup-welcomed
    owner: growth
    route: growth-oncall
    trigger: {span: signup.completed}
    expect: [{span: welcome.sent}]
"""
HEAVY_RULES = Path(__file__).resolve().parent / "rules" / "verdicts.yaml"
# Every route of both mixes, to the soak's local webhook (format: its port).
CONFIG = """routes:
  growth-oncall:
    webhook: {{url: 'http://127.0.0.1:{port}/hook'}}
  bench:
    webhook: {{url: 'http://127.0.0.1:{port}/hook'}}
"""


@dataclass
class Export:
    body: bytes
    spans: Counter[str]  # trace id -> spans of it in this export
    triggers: list[str]  # trace ids with a trigger span in this export
    first_sent: float = 0.0  # time.monotonic()
    acked: bool = False


class Mix(Protocol):
    name: str
    rules: str
    expected: dict[str, str | None]

    def build(self) -> Export: ...


def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _span(trace_id: bytes, name: str, parent: bytes = b"", padding: int = 0) -> Span:
    now = time.time_ns()
    span = Span(trace_id=trace_id, span_id=os.urandom(8), parent_span_id=parent, name=name,
                start_time_unix_nano=now, end_time_unix_nano=now + 1000,
                status=Status(code=Status.STATUS_CODE_OK))
    span.attributes.append(_kv("customer.id", f"c-{random.randrange(10_000)}"))
    if padding:
        span.attributes.append(_kv("payload", "x" * padding))
    return span


class SignupMix:
    name = "signup"
    rules = SIGNUP_RULES

    def __init__(self, fillers: int, padding: int) -> None:
        self.expected: dict[str, str | None] = {"signup-welcomed": None}
        self.fillers, self.padding = fillers, padding
        self.pending_outcome: Span | None = None

    def build(self) -> Export:
        whole, broken, split = os.urandom(16), os.urandom(16), os.urandom(16)
        trigger = _span(whole, "signup.completed")
        spans = [_span(whole, "welcome.sent", trigger.span_id), trigger]
        spans += [_span(whole, "db.query", trigger.span_id, self.padding)
                  for _ in range(self.fillers)]
        spans.append(_span(broken, "signup.completed"))
        split_trigger = _span(split, "signup.completed")
        spans.append(split_trigger)
        if self.pending_outcome is not None:
            spans.append(self.pending_outcome)
        self.pending_outcome = _span(split, "welcome.sent", split_trigger.span_id)
        resource = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
        resource.resource.attributes.append(_kv("service.name", "accounts"))
        body = ExportTraceServiceRequest(resource_spans=[resource]).SerializeToString()
        return Export(body, Counter(s.trace_id.hex() for s in spans),
                      [whole.hex(), broken.hex(), split.hex()])


class HeavyMix:
    name = "heavy"

    def __init__(self, traces: int, seed: int) -> None:
        self.expected: dict[str, str | None] = {"bench-heavy-pass": "passed",
                                                "bench-heavy-fail": "failed"}
        self.rules = HEAVY_RULES.read_text()
        self.load = workload(lambda g: HEAVY, spans=traces * SPANS_PER_TRACE, templates=4,
                             seed=seed)
        self.next = 0

    def build(self) -> Export:
        n, self.next = self.next, self.next + 1
        ids = [trace_id for trace_id, _ in self.load.traces(n)]
        return Export(self.load.request(n), Counter(dict.fromkeys(ids, SPANS_PER_TRACE)), ids)


def make(name: str, *, fillers: int, padding: int, traces: int) -> Mix:
    if name == "heavy":
        return HeavyMix(traces, seed=random.randrange(1 << 30))
    return SignupMix(fillers, padding)
