"""GET /api/v1/suggestions on a real uvicorn socket over spans stored by the real Store, and
``outcomewatch suggest --api`` (the real command) rendering its answer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from outcomewatch.api.app import create_app
from outcomewatch.offline.suggest import suggest
from outcomewatch.otlp import batch_from_request
from outcomewatch.store.duckdb import Store
from outcomewatch.store.queries import Reader
from tests.servers import running_asgi

S = 10**9
TRACES = 25
UNSHIPPED = {3, 9, 15, 21, 24}  # 5 of 25: 20% missing


def orders_request(now_ns: int) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.add(key="service.name", value={"string_value": "shop"})
    spans = resource_spans.scope_spans.add().spans
    for i in range(TRACES):
        trace, root = os.urandom(16), os.urandom(8)
        start = now_ns - 3600 * S + i * S
        spans.append(Span(trace_id=trace, span_id=root, name="order.placed",
                          kind=Span.SPAN_KIND_SERVER, start_time_unix_nano=start,
                          end_time_unix_nano=start + S // 10,
                          status=Status(code=Status.STATUS_CODE_UNSET)))
        if i not in UNSHIPPED:
            spans.append(Span(trace_id=trace, span_id=os.urandom(8), parent_span_id=root,
                              name="order.shipped", start_time_unix_nano=start + S // 100,
                              end_time_unix_nano=start + S // 2,
                              status=Status(code=Status.STATUS_CODE_OK)))
    return request


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "outcomewatch.duckdb"

    async def write() -> None:
        store = Store(str(path))
        try:
            now = time.time_ns()
            await store.append_spans(batch_from_request(orders_request(now), received_ns=now))
        finally:
            store.close()

    asyncio.run(write())
    return path


@pytest.fixture
def api(db: Path) -> Iterator[str]:
    conn = duckdb.connect(str(db))  # read-write, as the server holds it

    def suggester(*, since: timedelta, trigger: str, min_traces: int) -> dict[str, Any]:
        since_ns = time.time_ns() - int(since.total_seconds() * S)
        return suggest(conn, since_ns=since_ns, trigger=trigger, min_traces=min_traces)

    try:
        with running_asgi(create_app(Reader(conn), suggest=suggester)) as base_url:
            yield base_url
    finally:
        conn.close()


def test_the_api_proposes_the_rule_with_its_missing_share(api: str) -> None:
    answer = httpx.get(f"{api}/api/v1/suggestions", params={"min_traces": 10}).json()

    [proposal] = answer["suggestions"]
    assert proposal["rule"]["trigger"] == {"span": "order.placed", "service": "shop"}
    assert proposal["rule"]["expect"] == [
        {"span": "order.shipped", "service": "shop", "status": "ok"}]
    [outcome] = proposal["observed"]["outcomes"]
    assert outcome["missing_share"] == 0.2
    assert outcome["delay_p50_s"] == pytest.approx(0.5)
    assert proposal["rule"]["within"] == "11s"  # p99 0.5s + the 10s export margin, rounded up


def test_the_api_finds_nothing_for_a_trigger_glob_that_matches_no_start(api: str) -> None:
    answer = httpx.get(f"{api}/api/v1/suggestions",
                       params={"min_traces": 10, "trigger": "order.shipped"}).json()
    assert answer["suggestions"] == [] and answer["workflows"] == 0


def test_the_api_refuses_a_bare_number_as_since(api: str) -> None:
    response = httpx.get(f"{api}/api/v1/suggestions", params={"since": "600"})
    assert response.status_code == 400
    assert "a bare number is not a duration" in response.json()["detail"]


def test_without_a_suggester_the_route_answers_503(db: Path) -> None:
    conn = duckdb.connect(str(db))
    try:
        with running_asgi(create_app(Reader(conn))) as base_url:
            response = httpx.get(f"{base_url}/api/v1/suggestions")
    finally:
        conn.close()
    assert response.status_code == 503


def test_the_command_renders_the_api_answer(api: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "outcomewatch", "suggest", "--api", api, "--min-traces", "10"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "1 rule(s) proposed from 1 workflow start(s) with at least 10 traces"
    assert lines[2] == "order.placed: trigger order.placed (shop), 25 traces, within 11s"
    assert lines[4].split() == ["order.shipped", "20.0%", "20.0%", "20/0/0", "0.500s", "0.500s"]
    assert lines[5] == "  backtest: not run"


def test_the_command_says_in_one_line_when_the_api_cannot_be_reached(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "outcomewatch", "suggest", "--api", "http://127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("outcomewatch: cannot reach http://127.0.0.1:1/api/v1/")
    assert len(done.stderr.splitlines()) == 1


def test_the_json_format_is_the_api_answer(api: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "outcomewatch", "suggest", "--api", api, "--min-traces", "10",
         "--format", "json"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    answer = httpx.get(f"{api}/api/v1/suggestions", params={"min_traces": 10}).json()
    # since_ns is counted back from the moment of each request
    assert printed.pop("since_ns") <= answer.pop("since_ns")
    assert printed == answer
