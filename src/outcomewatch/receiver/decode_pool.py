"""Decoding OTLP/protobuf exports in worker processes (``serve --decode-workers``).

Why processes: the server's Python runs under one GIL, and the decode of an export (protobuf
fields read span by span, then the Arrow rows of the store) is the largest piece of Python per
span. In the server's process it also slows the DuckDB writer far beyond its own cost: DuckDB's
Python client takes the GIL back between the tasks of every statement, and each time waits for
the thread that holds it (a 1,500-span insert measured 7 ms alone, ~110 ms beside one busy
Python thread). A worker gets the request's bytes and sends back the batch as one Arrow IPC
buffer (``SpanBatch.to_wire``): no per-span pickling either way.

Contract: ``decode`` gives the same batch (accepted spans, rejections and their messages) as
``otlp.batch_from_request(otlp.parse_protobuf(body), ...)`` in the server's process, and raises
the same InvalidPayload. ``workers=0`` decodes in the calling process. A worker that dies (the
kernel's OOM killer, say) costs no export: the pool is replaced, and the export that saw it die
is decoded in the server's process (an export is acknowledged only once stored, so nothing
acknowledged depends on a worker). A worker outlives the server by at most PARENT_CHECK_S.
Workers are started with ``spawn``: forking a process that runs grpc and DuckDB threads is
unsafe.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from outcomewatch import otlp
from outcomewatch.otlp import SpanBatch, WireBatch
from outcomewatch.otlp_limits import SpanLimits

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 4
PARENT_CHECK_S = 0.5  # how often a worker checks that the server is still there


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on, as a container sees them: its affinity, or its
    cgroup's CPU quota when lower (v2 ``cpu.max``, v1 ``cpu/cpu.cfs_quota_us`` over
    ``cfs_period_us``; a quota of 1.5 CPUs counts as 2)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quotas = [(cgroup / "cpu.max", None), (cgroup / "cpu" / "cpu.cfs_quota_us",
                                            cgroup / "cpu" / "cpu.cfs_period_us")]
    for quota_path, period_path in quotas:
        try:
            fields = quota_path.read_text().split()
            if period_path is not None:
                fields.append(period_path.read_text().strip())
            quota, period = int(fields[0]), int(fields[1])
        except (OSError, ValueError, IndexError):  # absent, "max" or -1: no quota
            continue
        if quota > 0 and period > 0:
            cpus = min(cpus or 1, math.ceil(quota / period))
    return cpus or 1


def auto_workers(cpus: int | None = None) -> int:
    """The default worker count: one per usable CPU beyond the one the server's own threads
    use, at most MAX_AUTO_WORKERS; 0 on a single CPU."""
    return max(0, min(MAX_AUTO_WORKERS, (cpus or usable_cpus()) - 1))


def decode_here(body: bytes, received_ns: int, limits: SpanLimits) -> SpanBatch:
    """Decode in the calling process."""
    return otlp.batch_from_request(otlp.parse_protobuf(body), received_ns=received_ns,
                                   limits=limits, body=body)


def _decode_in_worker(body: bytes, received_ns: int, limits: SpanLimits) -> WireBatch:
    return decode_here(body, received_ns, limits).to_wire()


def _ready() -> int:
    return os.getpid()


def _start_worker(server_pid: int) -> None:
    """Run in each worker first. A terminal's Ctrl-C, or systemd's SIGTERM to the whole unit,
    reaches the workers too: the server decides when they stop (``close``), so they neither die
    mid-export nor print a KeyboardInterrupt traceback of their own. And a worker leaves when
    the server is gone without closing it (``kill -9``, a crash): its task queue would never
    tell it (the worker holds both ends of the pipe), so a thread checks the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_leave_with, args=(server_pid,), daemon=True,
                     name="decode-worker-watchdog").start()


def _leave_with(server_pid: int) -> None:
    while os.getppid() == server_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


class DecodePool:
    """``await decode(body, received_ns)`` -> SpanBatch; ``start()`` before, ``close()`` after."""

    def __init__(self, workers: int, limits: SpanLimits) -> None:
        if workers < 0:
            raise ValueError(f"decode workers must be 0 or more, got {workers}")
        self.workers = workers
        self._limits = limits
        self._pool: ProcessPoolExecutor | None = None
        self.replaced = 0  # pools replaced after a worker died

    async def start(self) -> None:
        """Start the workers and wait until each has imported what it needs (a second or so),
        so that the first exports do not pay for it."""
        if self.workers:
            self._pool = self._new_pool()
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(self._pool, _ready)
                                   for _ in range(self.workers)))

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(os.getpid(),))

    def pids(self) -> list[int]:
        """The worker processes' ids (for tests and diagnostics)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return sorted(processes)

    async def decode(self, body: bytes, received_ns: int) -> SpanBatch:
        pool = self._pool
        if pool is None:
            return decode_here(body, received_ns, self._limits)
        try:
            wire = await asyncio.get_running_loop().run_in_executor(
                pool, _decode_in_worker, body, received_ns, self._limits)
        except BrokenProcessPool:
            self._replace(pool)
            return decode_here(body, received_ns, self._limits)
        return SpanBatch.from_wire(wire)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if self._pool is not broken:
            return  # another export has replaced it already
        log.error("a decode worker died; starting new ones (the exports it held are decoded "
                  "in the server's process)")
        self.replaced += 1
        self._pool = self._new_pool()
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the workers (the exports they hold are waited for)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=False)


__all__ = ["DecodePool", "auto_workers", "decode_here", "usable_cpus"]
