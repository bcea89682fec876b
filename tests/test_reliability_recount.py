"""A failure counted twice (Reliability II, item 10), with a real process killed on purpose just
after its failures are counted.

Each round sends failing traces (triggers only), waits until the API shows every one of them
failed and counted in the incident, kills the server with SIGKILL at once (the restart's
recovery then replays those traces with their verdicts just stored), restarts on the same file
and sends the next round. After a clean stop, the file must hold one incident_failures row per
failed run and ``sum(failure_count)`` equal to that number.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import grpc

from tests.processes import Export, RawClient, ServeProcess, make_span, read_db, serving, wait_for

ROUNDS = 3
TRACES = 100  # per round


def _failing(count: int) -> tuple[Export, set[str]]:
    ids = [os.urandom(16) for _ in range(count)]
    return Export.of([make_span(t, "signup.completed") for t in ids]), {t.hex() for t in ids}


def _counted(server: ServeProcess) -> int:
    incidents = server.client.get("/api/v1/incidents").json()["incidents"]
    return sum(int(i["failure_count"]) for i in incidents)


def test_kill_9_right_after_failures_are_counted_never_counts_one_twice(tmp_path: Path) -> None:
    db = tmp_path / "data" / "ow.duckdb"
    failed: set[str] = set()
    for _ in range(ROUNDS):
        export, ids = _failing(TRACES)
        failed |= ids
        with serving(tmp_path, trace_idle="150ms", db=db) as server:
            client = RawClient(server.grpc_endpoint)
            assert client.send(export.body) == grpc.StatusCode.OK
            client.close()

            expected = len(failed)
            def counted(s: ServeProcess = server, n: int = expected) -> bool:
                return _counted(s) >= n

            wait_for(counted, "the round's failures to be counted")
            server.kill9()
    # A last start recovers the last round, then a clean stop.
    with serving(tmp_path, trace_idle="150ms", db=db) as server:
        wait_for(lambda: {r["trace_id"] for r in server.runs(status="failed")} >= failed,
                 "every failure after the last restart")
        assert server.terminate() == 0, server.output()[-2000:]
    runs = read_db(db, "SELECT trace_id, id, status FROM runs")
    assert Counter(t for t, _, _ in runs) == Counter(failed)
    assert {s for _, _, s in runs} == {"failed"}
    rows = read_db(db, "SELECT run_id FROM incident_failures")
    assert {r: n for r, n in Counter(r for (r,) in rows).items() if n > 1} == {}
    assert {r for (r,) in rows} == {i for _, i, _ in runs}
    assert read_db(db, "SELECT sum(failure_count) FROM incidents") == [(len(failed),)]
