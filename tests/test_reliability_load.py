"""Back-pressure: the writer's queue is bounded (--max-queue); when it is full an export is
refused with gRPC UNAVAILABLE / HTTP 503 + Retry-After, which exporters retry, instead of being
buffered without limit. The server stays up, its memory stays bounded, nothing acknowledged is
lost, and it recovers once the load drops."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from tests.processes import (
    Export,
    RawClient,
    inprocess_server,
    make_span,
    read_db,
    serving,
    wait_for,
)
from tests.spans import sdk_spans

SENDERS = 32
MAX_ROUNDS = 8  # rounds of SENDERS concurrent exports, until one is refused (bounded)
GiB_KIB = 1024 * 1024


def _big_export(spans: int = 1000, padding: int = 2048) -> Export:
    """~2 MiB: a thousand spans of one trace, each with 2 KiB of attributes."""
    trace_id = os.urandom(16)
    return Export.of([make_span(trace_id, "db.query", size=padding) for _ in range(spans)])


def test_overload_is_refused_with_unavailable_memory_stays_bounded_nothing_acked_is_lost(
    tmp_path: Path,
) -> None:
    exports = [_big_export() for _ in range(SENDERS)]
    acks: Counter[int] = Counter()
    codes: Counter[grpc.StatusCode] = Counter()
    lock = threading.Lock()
    with serving(tmp_path, trace_idle="1s", args=["--max-queue", "2"]) as server:
        start_rss = server.rss_kib()
        peak_rss = start_rss
        sampling = threading.Event()

        def sample() -> None:
            nonlocal peak_rss
            while not sampling.wait(0.01):
                peak_rss = max(peak_rss, server.rss_kib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def send(i: int, client: RawClient) -> None:
            code = client.send(exports[i].body, timeout_s=60)
            with lock:
                codes[code] += 1
                if code == grpc.StatusCode.OK:
                    acks[i] += 1

        clients = [RawClient(server.grpc_endpoint) for _ in range(4)]
        try:
            for _ in range(MAX_ROUNDS):  # offer more than the writer takes, all at once
                senders = [threading.Thread(target=send, args=(i, clients[i % 4]))
                           for i in range(SENDERS)]
                for thread in senders:
                    thread.start()
                for thread in senders:
                    thread.join(timeout=120)
                if codes[grpc.StatusCode.UNAVAILABLE]:
                    break
            sampling.set()
            sampler.join()

            assert server.popen.poll() is None, server.output()
            assert codes[grpc.StatusCode.UNAVAILABLE] > 0, codes
            assert codes[grpc.StatusCode.OK] > 0, codes
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
            assert peak_rss < start_rss + 3 * GiB_KIB // 2, (start_rss, peak_rss)
            # Recovered: the load gone, an export is accepted at once.
            assert clients[0].send(exports[0].body) == grpc.StatusCode.OK
            acks[0] += 1
            assert server.client.get("/readyz").status_code == 200
        finally:
            for client in clients:
                client.close()
        assert server.terminate() == 0

    copies = dict(read_db(tmp_path / "data" / "ow.duckdb",
                          "SELECT span_id, count(*) FROM spans GROUP BY ALL"))
    for i, acked in acks.items():
        # Each acknowledgement is a committed copy of every span of the export.
        assert min(copies.get(span_id, 0) for _, span_id in exports[i].spans) >= acked


def test_the_official_exporter_retries_after_unavailable_and_then_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="opentelemetry.exporter.otlp.proto.grpc.exporter")
    with inprocess_server(tmp_path, max_queue=1) as running:
        store = running.server.store
        assert store is not None
        # Hold the writer inside a job, and fill the queue behind it: the store is now full.
        started, release = threading.Event(), threading.Event()
        def hold(db: object) -> None:
            started.set()
            release.wait(20)

        store.submit(hold)
        assert started.wait(10)
        store.submit(lambda db: None)

        http = running.api.post(
            f"http://127.0.0.1:{running.server.http_port}/v1/traces",
            content=Export.of([make_span(os.urandom(16), "a")]).body,
            headers={"Content-Type": "application/x-protobuf"})
        assert (http.status_code, http.headers.get("Retry-After")) == (503, "1")

        spans = sdk_spans("accounts")
        trace_id = f"{spans[0].context.trace_id:032x}"
        exporter = OTLPSpanExporter(endpoint=running.grpc_endpoint, insecure=True, timeout=20)
        results: list[SpanExportResult] = []
        exporting = threading.Thread(target=lambda: results.append(exporter.export(spans)))
        exporting.start()
        try:
            wait_for(lambda: any("UNAVAILABLE" in r.getMessage() for r in caplog.records),
                     "the exporter to be refused with UNAVAILABLE", timeout_s=20)
            assert results == []  # still retrying
        finally:
            release.set()
            exporting.join(timeout=30)
            exporter.shutdown()
        assert results == [SpanExportResult.SUCCESS]
        stored = running.get(f"/api/v1/traces/{trace_id}")["spans"]
        assert sorted(s["name"] for s in stored) == ["POST /orders", "charge"]
