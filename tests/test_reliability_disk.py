"""A full disk that comes back (Reliability II, item 1), on a real disk: a small tmpfs mounted by
the test (root only; CI runs as root), filled by a file and freed by deleting it, under a real
``outcomewatch serve`` process fed over gRPC.

The checkpoint interval (30 s by default) is a hidden setting, so the idle checkpoint comes
within a fraction of a second instead of after 30 s of a full disk. The room check before a
checkpoint can be switched off (``OUTCOMEWATCH_CHECKPOINT_RESERVE_BYTES=off``) to force what a
nearly full disk does when the check guesses wrong: DuckDB invalidates the database.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import grpc
import pytest

from outcomewatch.store.database import INTERVAL_ENV, RESERVE_ENV
from tests.processes import (
    Export,
    RawClient,
    ServeProcess,
    SignupTraces,
    make_span,
    read_db,
    serving,
    wait_for,
)
from tests.system import require


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 32 MiB tmpfs, unmounted afterwards."""
    require("mount")
    if os.geteuid() != 0:
        message = "mounting a tmpfs needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mountpoint)],
                   check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


class Filler:
    """A file that takes all the free space of a disk (but ``leave`` bytes), until freed."""

    def __init__(self, disk: Path, *, leave: int = 0) -> None:
        self.path = disk / "filler"
        self._file: BinaryIO | None = self.path.open("wb", buffering=0)
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            while os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - size >= leave:
                try:
                    self._file.write(b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break

    def free(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.path.unlink()


@contextlib.contextmanager
def filled(disk: Path, *, leave: int = 0) -> Iterator[Filler]:
    filler = Filler(disk, leave=leave)
    try:
        yield filler
    finally:
        filler.free()


def _incompressible_export(*, spans: int) -> Export:
    """60 KB of random attribute values per span (hex: DuckDB cannot shrink it much), in
    ``spans`` spans no rule looks at."""
    trace_id = os.urandom(16)
    return Export.of([make_span(trace_id, "db.query",
                                attributes={"blob": os.urandom(30_000).hex()})
                      for _ in range(spans)])


def _assert_store_logs_one_line_each(output: str) -> None:
    """What the store logs is one line per record: no traceback follows any of them. (The
    notifier's and /metrics' behaviour on a failing disk is another issue's.)"""
    lines = output.splitlines()
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        if " outcomewatch.store." in line:
            assert not following.startswith("Traceback"), f"{line}\n{following}"


def _ready(server: ServeProcess) -> int:
    return server.client.get("/readyz").status_code


def _stored_spans(db: Path) -> set[tuple[str, str]]:
    return set(read_db(db, "SELECT trace_id, span_id FROM spans"))


def _serve(
    tmp_path: Path, disk: Path, *, trace_idle: str = "200ms"
) -> contextlib.AbstractContextManager[ServeProcess]:
    # The log stays off the small disk: it must not be what fills it.
    return serving(tmp_path, db=disk / "ow.duckdb", log=tmp_path / "serve.log",
                   trace_idle=trace_idle)


def test_a_checkpoint_failing_on_a_full_disk_is_recovered_from_without_a_restart(
    tmp_path: Path, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0.2")
    monkeypatch.setenv(RESERVE_ENV, "off")  # attempt the checkpoint even without room
    traces = SignupTraces.build(60)
    acked: set[int] = set()
    # No verdict falls due during the test (trace_idle 1h): only exports write.
    with _serve(tmp_path, disk, trace_idle="1h") as server:
        client = RawClient(server.grpc_endpoint)
        for i in range(20):
            assert client.send(traces.exports[i].body) == grpc.StatusCode.OK
            acked.add(i)
        # Nearly full: room for the WAL of a 6 MB export (with its index rows, 1.5 MB to
        # spare), not for the checkpoint writing
        # them again into the database file (more than its free blocks can take).
        # One export, so that no checkpoint can come between its parts.
        big = _incompressible_export(spans=96)
        with filled(disk, leave=7 * 1024 * 1024 + 512 * 1024) as filler:
            assert client.send(big.body) == grpc.StatusCode.OK
            # Idle with a WAL to write: the next checkpoint fails and DuckDB invalidates it.
            wait_for(lambda: "invalidated by a failed checkpoint" in server.output(),
                     "the checkpoint to fail on the full disk")
            wait_for(lambda: _ready(server) == 503, "/readyz to say storage fails")
            codes = {i: client.send(traces.exports[i].body) for i in range(21, 30)}
            assert grpc.StatusCode.UNAVAILABLE in codes.values()
            acked |= {i for i, code in codes.items() if code == grpc.StatusCode.OK}
            filler.free()
            wait_for(lambda: _ready(server) == 200, "/readyz to recover once space is back")
        assert "re-opened after it was invalidated" in server.output()
        for i in range(30, 60):
            assert client.send(traces.exports[i].body) == grpc.StatusCode.OK
            acked.add(i)
        client.close()
        assert server.terminate() == 0, server.output()[-2000:]
        output = server.output()
    _assert_store_logs_one_line_each(output)
    expected = {span for i in acked for span in traces.exports[i].spans}
    expected |= big.spans
    assert expected <= _stored_spans(server.db)


def test_while_writes_fail_on_a_full_disk_no_checkpoint_is_tried_and_ingest_recovers(
    tmp_path: Path, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0.2")
    traces = SignupTraces.build(300)
    acked: set[int] = set()
    with _serve(tmp_path, disk) as server:
        client = RawClient(server.grpc_endpoint)
        for i in range(10):
            assert client.send(traces.exports[i].body) == grpc.StatusCode.OK
            acked.add(i)
        with filled(disk) as filler:
            refused = next((i for i in range(10, 290)
                            if client.send(traces.exports[i].body) != grpc.StatusCode.OK), None)
            assert refused is not None, "every export was acknowledged on a full disk"
            acked |= set(range(10, refused))
            assert client.send(traces.exports[290].body) == grpc.StatusCode.UNAVAILABLE
            wait_for(lambda: _ready(server) == 503, "/readyz to say storage fails")
            filler.free()
            wait_for(lambda: _ready(server) == 200, "/readyz to recover once space is back")
        for i in range(291, 300):
            assert client.send(traces.exports[i].body) == grpc.StatusCode.OK
            acked.add(i)
        client.close()
        assert server.terminate() == 0
        output = server.output()
    assert "checkpoint failed" not in output and "invalidated" not in output
    _assert_store_logs_one_line_each(output)
    expected = {span for i in acked for span in traces.exports[i].spans}
    assert expected <= _stored_spans(server.db)


def test_a_stop_on_a_full_disk_exits_1_and_a_start_with_little_room_works(
    tmp_path: Path, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "3600")  # only the final checkpoint
    monkeypatch.setenv(RESERVE_ENV, "off")
    traces = SignupTraces.build(40)
    with _serve(tmp_path, disk) as server:
        client = RawClient(server.grpc_endpoint)
        for i in range(20):
            assert client.send(traces.exports[i].body) == grpc.StatusCode.OK
        client.close()
        with filled(disk):
            assert server.terminate() == 1
            output = server.output()
    last = output.strip().splitlines()[-1]
    assert last.startswith("outcomewatch: ") and "closed uncleanly" in last, last
    _assert_store_logs_one_line_each(output)

    # A start with ~1 MiB free and a WAL to replay: it postpones the checkpoint and serves.
    monkeypatch.delenv(RESERVE_ENV)
    with filled(disk, leave=1 << 20), _serve(tmp_path, disk) as server:
        assert "without a checkpoint" in server.output()
        assert _ready(server) == 200
        client = RawClient(server.grpc_endpoint)
        for i in range(20, 40):
            assert client.send(traces.exports[i].body) == grpc.StatusCode.OK
        client.close()
        assert server.terminate() == 0
    expected = {span for export in traces.exports for span in export.spans}
    assert expected <= _stored_spans(server.db)
