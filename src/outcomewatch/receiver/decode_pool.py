"""Decoding OTLP/protobuf exports in worker processes (``serve --decode-workers``).

Why processes: the server's Python runs under one GIL, and the decode of an export (protobuf
fields read span by span, then the Arrow rows of the store) is the largest piece of Python per
span. In the server's process it also slows the DuckDB writer far beyond its own cost: DuckDB's
Python client takes the GIL back between the tasks of every statement, and each time waits for
the thread that holds it (a 1,000-span insert measured 2.3 ms alone, 75 ms beside one busy
Python thread). A worker gets the request's bytes and sends back the batch as one Arrow IPC
buffer (``SpanBatch.to_wire``): no per-span pickling either way.

Why pipes read by the event loop rather than a ProcessPoolExecutor: the executor moves every
task and result through two threads of its own (a feeder and a result handler) that took 12-17%
of the server's samples and contended for the GIL with the writer. Here the loop writes the
body to a worker's stdin and reads the reply from its stdout (receiver/decode_worker.py has the
protocol); exports are pipelined, several to a worker, answered in order.

Contract: ``decode`` gives the same batch (accepted spans, rejections and their messages) as
``otlp.batch_from_request(otlp.parse_protobuf(body), ...)`` in the server's process, and raises
the same InvalidPayload. ``workers=0`` decodes in the calling process, and so does a pool whose
workers are not ready yet. A worker that dies (the kernel's OOM killer, say) costs no export: it
is replaced, and the exports it held are decoded in the server's process (an export is
acknowledged only once stored, so nothing acknowledged depends on a worker). A worker leaves
when the server does, however the server ends: its stdin closes. ``start``, ``decode`` and
``close`` run on one event loop (the pipes belong to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pickle
import sys
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from outcomewatch.otlp import SpanBatch, WireBatch
from outcomewatch.otlp_limits import SpanLimits
from outcomewatch.receiver.decode_worker import FRAME, REQUEST, decode_here

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 4


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


STREAM_LIMIT = 1 << 22  # a reply is read whole: do not pause the pipe below this many bytes
CLOSE_TIMEOUT_S = 10.0  # how long close() waits for a worker to answer what it holds


class _WorkerGone(Exception):
    """The worker's stdout ended with exports unanswered."""


class _Worker:
    """One worker process and the replies it owes, in the order the requests were written."""

    def __init__(self, process: asyncio.subprocess.Process,
                 on_gone: Callable[[_Worker], None]) -> None:
        self.process = process
        self._on_gone = on_gone
        self.gone = False  # its replies ended: exited, killed, or closed
        self._ready = asyncio.Event()
        self._owed: deque[asyncio.Future[bytes]] = deque()
        self._reader = asyncio.create_task(self._read_replies())

    @property
    def started(self) -> bool:
        """It said it was ready (it may have died since)."""
        return self._ready.is_set()

    @property
    def ready(self) -> bool:
        return self.started and not self.gone

    @property
    def load(self) -> int:
        return len(self._owed)

    def send(self, body: bytes, received_ns: int) -> asyncio.Future[bytes]:
        """Write one request; the future is its reply's payload, or _WorkerGone. Header and
        body are written with no await between them, so concurrent sends never interleave."""
        assert self.process.stdin is not None
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._owed.append(future)
        self.process.stdin.write(REQUEST.pack(len(body), received_ns))
        self.process.stdin.write(body)  # to a dead worker: dropped, and its stdout ends
        return future

    async def wait_ready(self) -> bool:
        """Wait until the worker has imported what it needs; False if it exited first."""
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({ready, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        return self.ready

    async def _read_replies(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            await stdout.readexactly(FRAME.size)
            self._ready.set()
            while True:
                (length,) = FRAME.unpack(await stdout.readexactly(FRAME.size))
                payload = await stdout.readexactly(length)
                future = self._owed.popleft()
                if not future.done():  # not cancelled by its exporter
                    future.set_result(payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker is gone: what it owes is decoded elsewhere
        finally:
            self.gone = True
            while self._owed:
                future = self._owed.popleft()
                if not future.done():
                    future.set_exception(_WorkerGone())
            self._on_gone(self)

    async def stop(self, timeout: float) -> None:
        """Close its stdin, wait for the replies it owes and its exit (killed after
        ``timeout``)."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        _, late = await asyncio.wait({self._reader}, timeout=timeout)
        if late:
            log.error("a decode worker did not answer within %.0f s of closing; killed it",
                      timeout)
        await self.reap()

    async def reap(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.process.returncode is None:
                self.process.kill()
        await self.process.wait()
        await asyncio.gather(self._reader, return_exceptions=True)


class DecodePool:
    """``await decode(body, received_ns)`` -> SpanBatch; ``await start()`` before,
    ``await close()`` after."""

    def __init__(self, workers: int, limits: SpanLimits) -> None:
        if workers < 0:
            raise ValueError(f"decode workers must be 0 or more, got {workers}")
        self.workers = workers
        self._limits = limits
        self._pool: list[_Worker] = []
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()  # replacements, reaps
        self.replaced = 0  # workers replaced after one died

    async def start(self) -> None:
        """Start the workers and wait until each has imported what it needs (a second or so),
        so that the first exports do not pay for it."""
        self._pool = [await self._spawn() for _ in range(self.workers)]
        if not all(await asyncio.gather(*(w.wait_ready() for w in self._pool))):
            await self.close()
            raise RuntimeError("a decode worker exited while starting (its error is above); "
                               "--decode-workers 0 decodes in the server's process")

    async def _spawn(self) -> _Worker:
        # The worker imports this package from where the server did (a source tree, a venv),
        # as multiprocessing's spawn does: the server's sys.path.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "outcomewatch.receiver.decode_worker", env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=STREAM_LIMIT)
        assert process.stdin is not None
        limits = pickle.dumps(self._limits)
        process.stdin.write(FRAME.pack(len(limits)) + limits)
        return _Worker(process, self._gone)

    def _gone(self, worker: _Worker) -> None:
        """A worker's replies ended: replaced, unless the pool is closing (a worker that dies
        idle is replaced too, not only one that dies holding an export), or it died before it
        was ready: a new one would too (a broken install, say), so its exports are decoded in
        the server's process from then on rather than by a worker respawned every second."""
        if self._closing or worker not in self._pool:
            return
        if not worker.started:
            log.error("a decode worker exited before it was ready (its error is above); its "
                      "share of the exports is decoded in the server's process")
            self._pool.remove(worker)
            self._in_background(worker.reap())
            return
        self._in_background(self._replace(worker))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task that close() waits for."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def pids(self) -> list[int]:
        """The worker processes' ids (for tests and diagnostics)."""
        return sorted(w.process.pid for w in self._pool)

    async def decode(self, body: bytes, received_ns: int) -> SpanBatch:
        ready = [w for w in self._pool if w.ready]
        if not ready:
            return decode_here(body, received_ns, self._limits)
        worker = min(ready, key=lambda w: w.load)
        try:
            payload = await worker.send(body, received_ns)
        except _WorkerGone:
            await self._replace(worker)
            return decode_here(body, received_ns, self._limits)
        kind, value = pickle.loads(payload)  # from our own worker
        if kind == "error":
            assert isinstance(value, BaseException)
            raise value
        assert isinstance(value, WireBatch)
        return SpanBatch.from_wire(value)

    async def _replace(self, gone: _Worker) -> None:
        if gone not in self._pool or self._closing:
            return  # another export has replaced it already, or the pool is closing
        log.error("a decode worker died (exit code %s); starting a new one (the exports it "
                  "held are decoded in the server's process)", gone.process.returncode)
        self.replaced += 1
        self._pool.remove(gone)
        await gone.reap()
        if self._closing:
            return
        new = await self._spawn()
        if self._closing:  # closed while it started: close() did not see it
            await new.stop(CLOSE_TIMEOUT_S)
        else:
            self._pool.append(new)

    async def close(self) -> None:
        """Stop the workers, once they have answered the exports they hold."""
        self._closing = True
        pool, self._pool = self._pool, []
        await asyncio.gather(*(w.stop(CLOSE_TIMEOUT_S) for w in pool))
        await asyncio.gather(*self._background, return_exceptions=True)


__all__ = ["DecodePool", "auto_workers", "decode_here", "usable_cpus"]
