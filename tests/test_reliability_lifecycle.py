"""Graceful lifecycle: SIGTERM stops accepting, lets in-flight exports commit and exits 0;
/readyz answers 503 while draining and while storage fails; a failing disk makes ingest answer
UNAVAILABLE / 503 instead of acknowledging, and the server recovers once the disk does.

The failing disk is real: the server process's RLIMIT_FSIZE is lowered to 0 from outside
(prlimit), so every write DuckDB makes to its file or WAL fails with EFBIG, as on a full disk;
raising it again is the disk recovering. That needs no root and no mount, unlike a full tmpfs,
and unlike chmod (which root ignores, and which an open file descriptor never notices).
"""

from __future__ import annotations

import asyncio
import os
import resource
import threading
from pathlib import Path

import grpc
import httpx

from tests.processes import (
    Export,
    RawClient,
    SignupTraces,
    Stream,
    inprocess_server,
    make_span,
    read_db,
    serving,
    wait_for,
)

PROTOBUF = {"Content-Type": "application/x-protobuf"}


def test_sigterm_mid_stream_commits_what_was_acknowledged_and_exits_0(tmp_path: Path) -> None:
    traces = SignupTraces.build(400)
    http_exports = SignupTraces.build(200).exports
    http_acked: list[int] = []
    with serving(tmp_path, trace_idle="200ms") as server:
        stream = Stream(server.grpc_endpoint, traces.exports, workers=4, pause_s=0.002)
        stop_http = threading.Event()

        def post_http() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{server.http}", timeout=20) as client:
                for i, export in enumerate(http_exports):
                    if stop_http.is_set():
                        return
                    try:
                        response = client.post("/v1/traces", content=export.body,
                                               headers=PROTOBUF)
                    except httpx.TransportError:
                        return  # the server has gone
                    if response.status_code == 200:
                        http_acked.append(i)

        http_thread = threading.Thread(target=post_http, daemon=True)
        http_thread.start()
        wait_for(lambda: stream.acked_count() >= 30 and len(http_acked) >= 10, "some acks")
        exit_code = server.terminate()
        stream.stop()
        stop_http.set()
        stream.join()
        http_thread.join(timeout=30)
        output = server.output()
    assert exit_code == 0, output
    assert "Traceback" not in output, output
    assert len(stream.acked) < len(traces.exports)  # it was stopped mid-stream

    stored = set(read_db(tmp_path / "data" / "ow.duckdb", "SELECT trace_id, span_id FROM spans"))
    assert stream.acked_spans() - stored == set()
    http_spans = {span for i in http_acked for span in http_exports[i].spans}
    assert http_spans - stored == set()


def test_readyz_is_503_while_draining_and_in_flight_exports_still_commit(
    tmp_path: Path,
) -> None:
    export = Export.of([make_span(os.urandom(16), "signup.completed")])
    db = tmp_path / "outcomewatch.duckdb"
    with inprocess_server(tmp_path) as running:
        server, store = running.server, running.server.store
        assert store is not None
        assert running.api.get("/readyz").status_code == 200
        # Hold the writer, so that an export is in flight (received, not yet committed) when
        # the stop begins.
        started, release = threading.Event(), threading.Event()
        def hold(db: object) -> None:
            started.set()
            release.wait(20)

        store.submit(hold)
        assert started.wait(10)
        client = RawClient(running.grpc_endpoint)
        late = RawClient(running.grpc_endpoint)
        codes: list[grpc.StatusCode] = []
        in_flight = threading.Thread(target=lambda: codes.append(client.send(export.body)))
        in_flight.start()
        wait_for(lambda: store._queue.qsize() > 0, "the export to reach the writer's queue")

        stopping = asyncio.run_coroutine_threadsafe(server.stop(), running.loop)
        running.stopped = True  # type: ignore[attr-defined]
        try:
            wait_for(lambda: running.api.get("/readyz").status_code == 503, "readyz 503")
            assert running.api.get("/readyz").json() == {"status": "not ready"}
            # Draining: new exports are refused, the one in flight is still waiting.
            assert late.send(export.body, timeout_s=5) == grpc.StatusCode.UNAVAILABLE
            assert codes == []
        finally:
            release.set()
            in_flight.join(timeout=30)
            stopping.result(timeout=30)
            client.close()
            late.close()
        assert codes == [grpc.StatusCode.OK]
    stored = set(read_db(db, "SELECT trace_id, span_id FROM spans"))
    assert export.spans <= stored


def _fail_writes(pid: int, failing: bool) -> None:
    """Make every file write of process ``pid`` fail with EFBIG (as on a full disk), or not."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0 if failing else hard, hard))


def test_a_failing_disk_is_answered_unavailable_and_readyz_503_until_it_recovers(
    tmp_path: Path,
) -> None:
    before, during, after = (Export.of([make_span(os.urandom(16), "signup.completed")])
                             for _ in range(3))
    with serving(tmp_path, trace_idle="1h") as server:
        client = RawClient(server.grpc_endpoint)
        http = httpx.Client(base_url=f"http://127.0.0.1:{server.http}", timeout=20)
        try:
            assert client.send(before.body) == grpc.StatusCode.OK
            _fail_writes(server.pid, True)
            try:
                assert client.send(during.body) == grpc.StatusCode.UNAVAILABLE
                refused = http.post("/v1/traces", content=during.body, headers=PROTOBUF)
                assert (refused.status_code, refused.headers.get("Retry-After")) == (503, "5")
                assert server.client.get("/readyz").status_code == 503
                assert server.popen.poll() is None
            finally:
                _fail_writes(server.pid, False)
            # The disk is back: the next export is committed and the server is ready again.
            assert client.send(after.body) == grpc.StatusCode.OK
            assert server.client.get("/readyz").status_code == 200
        finally:
            client.close()
            http.close()
        assert server.terminate() == 0, server.output()
    stored = set(read_db(tmp_path / "data" / "ow.duckdb", "SELECT trace_id, span_id FROM spans"))
    assert before.spans | after.spans <= stored
