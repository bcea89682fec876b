"""A full disk that comes back, at the issue's stated size (Reliability II, item 1): a small
tmpfs mounted by the test (root only; CI runs as root) held full for 45 s with the default
checkpoint interval (30 s, so a checkpoint falls due while the disk is full) while a client
keeps exporting, then freed. Ingest must recover without a restart and every acknowledged span
must be stored.

Holding the disk full for 45 s is what is tested (a checkpoint due on a full disk), not a timing.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from outcomewatch.store.database import INTERVAL_ENV, RESERVE_ENV
from tests.processes import RawClient, SignupTraces, Stream, wait_for
from tests.test_reliability_disk import _ready, _serve, _stored_spans, filled
from tests.test_reliability_disk import disk as disk  # the fixture: a fresh 32 MiB tmpfs

FULL_FOR_S = 45


def test_a_disk_full_for_45_s_with_a_checkpoint_due_recovers_without_a_restart(
    tmp_path: Path, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(INTERVAL_ENV, raising=False)  # the default 30 s
    monkeypatch.delenv(RESERVE_ENV, raising=False)
    traces = SignupTraces.build(1200)
    with _serve(tmp_path, disk) as server:
        client = RawClient(server.grpc_endpoint)
        for i in range(10):
            assert client.send(traces.exports[i].body) == grpc.StatusCode.OK
        with filled(disk) as filler:
            stream = Stream(server.grpc_endpoint, traces.exports, workers=1, pause_s=0.05,
                            indices=range(10, 1100))
            threading.Event().wait(FULL_FOR_S)  # the disk stays full: the point of the test
            stream.stop()
            stream.join()
            assert stream.refused, "every export was acknowledged on a full disk"
            assert set(stream.refused.values()) == {grpc.StatusCode.UNAVAILABLE}
            filler.free()
            wait_for(lambda: _ready(server) == 200, "/readyz to recover once space is back")
        acked = {*range(10), *stream.acked}
        later = iter(range(1100, 1200))

        def acknowledged() -> bool:
            i = next(later)
            if client.send(traces.exports[i].body) != grpc.StatusCode.OK:
                return False
            acked.add(i)
            return True

        wait_for(acknowledged, "ingest to acknowledge again")
        for i in later:
            assert client.send(traces.exports[i].body) == grpc.StatusCode.OK
            acked.add(i)
        client.close()
        print(f"{len(stream.acked)} acknowledged and {len(stream.refused)} refused while full")
        assert server.terminate() == 0, server.output()[-2000:]
    expected = {span for i in acked for span in traces.exports[i].spans}
    assert expected - _stored_spans(server.db) == set()
