"""``suggest`` proposes ``correlate`` when a workflow's outcome is another workflow start in a
trace of its own, linked to the first by a span link or sharing an id attribute; spans stored by
the real Store, the real command, the backtest by the offline replay."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from outcomewatch.otlp import batch_from_request
from outcomewatch.store.duckdb import Store

S = 10**9
PAIRS = 30
NO_JOB = {2, 7, 12, 17, 22, 27}  # 6 of 30 subscriptions never provisioned: 20%


def _span(trace: bytes, name: str, start: int, *,
          kind: Span.SpanKind.ValueType = Span.SPAN_KIND_INTERNAL,
          parent: bytes = b"", ok: bool = False, links: tuple[bytes, ...] = (),
          **attributes: str) -> Span:
    span = Span(trace_id=trace, span_id=os.urandom(8), parent_span_id=parent, name=name,
                kind=kind, start_time_unix_nano=start, end_time_unix_nano=start + S // 10,
                status=Status(code=Status.STATUS_CODE_OK if ok else Status.STATUS_CODE_UNSET))
    for key, value in attributes.items():
        span.attributes.add(key=key.replace("_", "."), value={"string_value": value})
    for target in links:
        span.links.add(trace_id=target, span_id=os.urandom(8))
    return span


def store(db: Path, *, linked: bool) -> None:
    now = time.time_ns()
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.add(key="service.name", value={"string_value": "billing"})
    spans = resource_spans.scope_spans.add().spans
    for i in range(PAIRS):
        start = now - 3600 * S + i * 10 * S
        webhook_trace, subscription = os.urandom(16), f"sub_{i}"
        spans.append(_span(webhook_trace, "billing.webhook", start, kind=Span.SPAN_KIND_SERVER,
                           subscription_id=subscription, customer_id=f"cus_{i}"))
        if i in NO_JOB:
            continue
        job_trace = os.urandom(16)
        job = _span(job_trace, "provisioning.job", start + 2 * S, kind=Span.SPAN_KIND_CONSUMER,
                    ok=True, links=(webhook_trace,) if linked else (),
                    subscription_id=subscription)
        spans.append(job)
        spans.append(_span(job_trace, "tenant.ready", start + 2 * S, parent=job.span_id,
                           ok=True))

    async def write() -> None:
        writer = Store(str(db))
        try:
            await writer.append_spans(batch_from_request(request, received_ns=now))
        finally:
            writer.close()

    asyncio.run(write())


def suggest_json(db: Path) -> dict[str, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "outcomewatch", "suggest", "--db", str(db), "--min-traces", "10",
         "--format", "json"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    return {s["rule"]["trigger"]["span"]: s for s in report["suggestions"]}


@pytest.mark.parametrize("linked", [True, False], ids=["linked", "shared-id"])
def test_an_outcome_in_another_trace_is_proposed_with_correlate(
    tmp_path: Path, linked: bool
) -> None:
    db = tmp_path / "ow.duckdb"
    store(db, linked=linked)

    proposals = suggest_json(db)

    webhook = proposals["billing.webhook"]
    assert webhook["rule"]["correlate"] == {"by": "subscription.id"}
    assert webhook["rule"]["expect"] == [
        {"span": "provisioning.job", "service": "billing", "status": "ok"}]
    [outcome] = webhook["observed"]["outcomes"]
    assert outcome["trace"] == "other"
    assert outcome["missing_share"] == 0.2
    assert outcome["linked_share"] == (1.0 if linked else 0.0)
    assert outcome["delay_p50_s"] == pytest.approx(2.1)
    assert webhook["backtest"]["runs"] == PAIRS
    assert webhook["backtest"]["failed"] == len(NO_JOB)
    # The job is a workflow of its own too, with its in-trace outcome.
    assert proposals["provisioning.job"]["rule"]["expect"] == [
        {"span": "tenant.ready", "service": "billing", "status": "ok"}]


def test_unrelated_starts_are_not_correlated(tmp_path: Path) -> None:
    db = tmp_path / "ow.duckdb"
    store(db, linked=False)
    # Different ids on each side: nothing ties the job to a webhook.
    import duckdb

    with duckdb.connect(str(db)) as conn:
        conn.execute("DELETE FROM spans WHERE name = 'billing.webhook'")
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.add(key="service.name", value={"string_value": "billing"})
    now = time.time_ns()
    for i in range(PAIRS):
        resource_spans.scope_spans.add().spans.append(
            _span(os.urandom(16), "billing.webhook", now - 60 * S, kind=Span.SPAN_KIND_SERVER,
                  subscription_id=f"other_{i}"))

    async def write() -> None:
        writer = Store(str(db))
        try:
            await writer.append_spans(batch_from_request(request, received_ns=now))
        finally:
            writer.close()

    asyncio.run(write())

    assert "billing.webhook" not in suggest_json(db)
