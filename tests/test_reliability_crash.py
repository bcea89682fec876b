"""Crash safety, with a real process killed by SIGKILL mid-stream.

The guarantee: an export is acknowledged only after its spans are committed. After kill -9 at any
moment, a restart on the same database rebuilds live traces and open runs; every trace still
gets exactly one verdict; no incident failure or notification is duplicated; no acknowledged
span is missing.

A client streams traces over raw gRPC with several exports in flight and notes which were
acknowledged; the server is killed after N acknowledgements, restarted on the same file, and
the client re-sends every export not acknowledged (as an exporter retries) plus the rest of the
stream. The result is checked through the API, then in the DuckDB file itself after a clean
SIGTERM shutdown.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.processes import SignupTraces, Stream, read_db, serving, wait_for
from tests.servers import running_asgi

EXPORTS = 160  # each: 3 traces (passing, broken, split across two exports), 6 spans


def _webhook() -> Starlette:
    async def accept(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"status": "success"})

    return Starlette(routes=[Route("/hook", accept, methods=["POST"])])


def _runs_by_trace(process: Any) -> dict[str, list[dict[str, Any]]]:
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for run in process.runs():
        by_trace.setdefault(run["trace_id"], []).append(run)
    return by_trace


@pytest.mark.parametrize("kill_after", [5, 37, 120])
def test_kill_9_mid_stream_loses_no_acknowledged_span_and_judges_every_trace_once(
    tmp_path: Path, kill_after: int
) -> None:
    traces = SignupTraces.build(EXPORTS)
    db = tmp_path / "data" / "ow.duckdb"
    with running_asgi(_webhook()) as hook:
        config = tmp_path / "config.yaml"
        config.write_text(f"routes:\n  growth-oncall:\n    webhook: {{url: '{hook}/hook'}}\n")
        args = ["--config", str(config)]

        # A short idle time: some runs fail (incident, outbox row) before the kill, others are
        # open when it lands.
        with serving(tmp_path, trace_idle="150ms", db=db, args=args) as first:
            stream = Stream(first.grpc_endpoint, traces.exports, workers=4, pause_s=0.005)
            wait_for(lambda: stream.acked_count() >= kill_after, f"{kill_after} acks")
            first.kill9()
            stream.stop()
            stream.join()
        acked_before_kill = set(stream.acked)
        assert len(acked_before_kill) >= kill_after

        with serving(tmp_path, trace_idle="300ms", db=db, args=args) as second:
            rest = [i for i in range(EXPORTS) if i not in acked_before_kill]
            retry = Stream(second.grpc_endpoint, traces.exports, workers=4, indices=rest)
            retry.join()
            assert retry.refused == {}
            acked = acked_before_kill | retry.acked
            assert acked == set(range(EXPORTS))

            def all_judged() -> bool:
                runs = _runs_by_trace(second)
                return set(runs) >= traces.triggers and all(
                    r["status"] != "open" for rs in runs.values() for r in rs)

            try:
                wait_for(all_judged, "a verdict on every trace")
            except AssertionError:
                runs = _runs_by_trace(second)
                missing = traces.triggers - set(runs)
                open_runs = [r for rs in runs.values() for r in rs if r["status"] == "open"]
                raise AssertionError(
                    f"{len(missing)} traces without a run (e.g. {sorted(missing)[:3]}), "
                    f"{len(open_runs)} open runs; server log:\n{second.output()[-3000:]}"
                ) from None

            runs = _runs_by_trace(second)
            assert {t: len(rs) for t, rs in runs.items() if len(rs) != 1} == {}
            status = {t: rs[0]["status"] for t, rs in runs.items()}
            assert {status[t] for t in traces.broken} == {"failed"}
            assert {status[t] for t in traces.passing} == {"passed"}
            incidents = second.client.get("/api/v1/incidents").json()["incidents"]
            failed = sum(1 for s in status.values() if s == "failed")
            assert sum(i["failure_count"] for i in incidents) == failed
            assert second.terminate() == 0

    # The file itself, read-only, after a clean shutdown.
    sent_spans = {span for export in traces.exports for span in export.spans}
    stored = set(read_db(db, "SELECT trace_id, span_id FROM spans"))
    assert sent_spans - stored == set()  # every span is acknowledged by now, so every span
    runs_in_db = read_db(db, "SELECT trace_id, status, count(*) FROM runs GROUP BY ALL")
    assert {(t, n) for t, _, n in runs_in_db if n != 1} == set()
    assert {t for t, _, _ in runs_in_db} == traces.triggers
    assert {s for _, s, _ in runs_in_db} <= {"passed", "failed"}
    failed_runs = read_db(db, "SELECT id FROM runs WHERE status = 'failed'")
    failures = read_db(db, "SELECT run_id, incident_id FROM incident_failures")
    assert Counter(r for r, _ in failures).most_common(1)[0][1] == 1  # no failure twice
    assert {r for r, _ in failures} == {r for (r,) in failed_runs}
    assert read_db(db, "SELECT sum(failure_count) FROM incidents") == [(len(failed_runs),)]
    assert read_db(db, "SELECT count(*) FROM incidents WHERE status = 'open'") == [(1,)]
    duplicates = read_db(db, "SELECT incident_id, transition, target, count(*) FROM outbox "
                             "GROUP BY ALL HAVING count(*) > 1")
    assert duplicates == []
    assert read_db(db, "SELECT transition, target FROM outbox") == [("opened", "webhook")]
