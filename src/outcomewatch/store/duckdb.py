"""The DuckDB writer: one thread owns every write, fed by a bounded queue, committing in groups.

Why one writer: DuckDB serialises writers anyway, and a single thread lets concurrent exports
share one transaction (group commit) so an acknowledgement costs one commit, not one per request.
Spans go in as one Arrow table per commit, never a row per INSERT; a group of exports alone is
that one INSERT in autocommit (``_append``), a group with verdicts or other work one
transaction around all of it.

Contract: ``await store.append_spans(batch)`` returns once the spans are committed (the export
may then be acknowledged); it raises Overloaded when the queue is full and StoreError when the
database fails. Verdicts are stored with conditional updates (``WHERE status = 'open'``), so a
verdict given twice (a restart, a re-sent trigger) is stored once and counted in an incident once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import cast

import duckdb
import pyarrow as pa

from outcomewatch.errors import Overloaded, StoreError
from outcomewatch.otlp import SpanBatch
from outcomewatch.store import incidents, traces, verdicts
from outcomewatch.store.database import STORE_LEVEL_ERRORS, Checkpoints, Database, first_line
from outcomewatch.store.server_reads import ServerReads
from outcomewatch.store.verdicts import VerdictBatch

log = logging.getLogger(__name__)

_RESOURCE_SCHEMA = pa.schema([("id", pa.int64()), ("resource", pa.binary())])



_MAX_GROUP = 256  # jobs per transaction; bounds the latency one commit adds
_REOPEN_EVERY_S = 1.0  # how often an idle writer tries to re-open an invalidated database
_MAX_KNOWN_RESOURCES = 10_000


Work = Callable[[duckdb.DuckDBPyConnection], object]


@dataclass
class _Job:
    """Spans to append, or a piece of work run on the writer's cursor inside the group's
    transaction; ``done`` receives the work's result or the exception that failed it."""

    spans: SpanBatch | None = None
    work: Work | None = None
    verdicts: VerdictBatch | None = None
    done: Callable[[object], None] | None = None


def _no_op(_: object) -> None:
    return None


_IDLE = _Job()  # the writer woke up without work: time to checkpoint or to re-open


class Store(ServerReads):
    """Owns the database file: schema, the writer thread, and the connection readers cursor from.
    The reads the server itself needs (recovery, evidence, the outbox) are in ServerReads."""

    def __init__(
        self, path: str, *, max_queue: int = 1024,
        on_commit: Callable[[float], None] | None = None,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        self._db = Database(path, checkpoints=checkpoints)
        # Readers (the API's Reader, ServerReads) only take cursors: the Database forwards them
        # to whichever connection is current, so they survive a re-open. Typed as a connection
        # so that they need no change.
        self.conn = cast(duckdb.DuckDBPyConnection, self._db)
        self._max_queue = max_queue
        # Called on the writer thread once a batch with incident transitions is committed
        # (their outbox rows are then readable): the server wakes its notifier.
        self.on_transitions: Callable[[], None] = lambda: None
        # Verdict events queued but not yet committed; over the bound, exports are refused.
        self._max_pending_verdicts = max(64, max_queue) * 64
        self._pending_verdicts = 0
        self._pending_lock = threading.Lock()
        self._on_commit = on_commit or (lambda seconds: None)
        self._known_resources: set[int] = set()
        self._index = traces.PendingIndex()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self.healthy = True  # False from a failed write (or an invalidated file) to a good one
        self._checkpoint_problem: str | None = None  # why the last checkpoint was not done
        self._thread = threading.Thread(target=self._run, name="duckdb-writer", daemon=True)
        self._thread.start()

    @property
    def _writer(self) -> duckdb.DuckDBPyConnection:
        """The writer thread's cursor (a new one after a re-open)."""
        return self._db.writer

    # -- submitting work ------------------------------------------------------------------

    def _submit(self, job: _Job) -> None:
        # Only incoming spans are refused when the writer falls behind (the exporter retries
        # them); verdicts are never refused, and their number is bounded by the open runs.
        if job.spans is not None:
            if self._queue.qsize() >= self._max_queue:
                raise Overloaded("storage queue is full", retry_after_s=1.0)
            # Verdicts are never refused (their number is bounded by the open runs), but a
            # backlog of them counts: new spans would only make it grow.
            if self._pending_verdicts >= self._max_pending_verdicts:
                raise Overloaded("verdict backlog is full", retry_after_s=1.0)
        if job.verdicts is not None:
            with self._pending_lock:
                self._pending_verdicts += len(job.verdicts)
        self._queue.put_nowait(job)

    async def _submit_and_wait(self, job: _Job) -> object:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()

        def done(result: object) -> None:
            loop.call_soon_threadsafe(_settle, future, result)

        job.done = done
        self._submit(job)
        result = await future
        if isinstance(result, BaseException):
            raise result
        return result

    def submit(self, work: Work) -> None:
        """Queue ``work`` for the writer without waiting; a failure is logged."""
        self._submit(_Job(work=work, done=_log_failure))

    async def run(self, work: Work) -> object:
        """Run ``work`` in the writer's next transaction and return its result once committed."""
        return await self._submit_and_wait(_Job(work=work))

    async def append_spans(self, batch: SpanBatch) -> None:
        """Commit ``batch``; return only once it is durable."""
        await self._submit_and_wait(_Job(spans=batch))

    def write_verdicts(self, batch: VerdictBatch) -> None:
        """Queue what the engine decided (see store/verdicts.py), in the engine's order: the
        writer is FIFO, and consecutive batches in one transaction are written as one."""
        if len(batch):
            self._submit(_Job(verdicts=batch, done=self._verdicts_done))

    def _verdicts_done(self, result: object) -> None:
        _log_failure(result)
        if isinstance(result, verdicts.Written) and result.transitions:
            self.on_transitions()

    async def write_verdicts_and_wait(self, batch: VerdictBatch) -> verdicts.Written:
        """``write_verdicts``, returning once committed with what it changed."""
        result = await self._submit_and_wait(_Job(verdicts=batch))
        assert isinstance(result, verdicts.Written)
        return result

    async def act(
        self, incident_id: int, action: incidents.Action, *, actor: str, comment: str | None,
        at: datetime, targets_for_route: dict[str, tuple[str, ...]],
    ) -> incidents.ActionResult:
        """A person's acknowledge / resolve / reopen, stored with its timeline and outbox rows."""
        result = await self.run(lambda db: incidents.act(
            db, incident_id, action, at=at, actor=actor, comment=comment,
            targets_for_route=targets_for_route))
        assert isinstance(result, incidents.ActionResult)
        return result

    def close(self) -> None:
        """Finish queued work, checkpoint, and close the file.

        Raises StoreError, after closing, when the stop is unclean: the final checkpoint failed
        or could not be attempted because the database is failing (nothing acknowledged is
        lost: the write-ahead log holds it and the next start replays it). A checkpoint only
        postponed for lack of disk space is logged, not raised."""
        self._queue.put(None)
        self._thread.join()
        self._index_now()
        with contextlib.suppress(duckdb.Error):
            self._writer.execute("UPDATE server_state SET running = false")
        problem = self._final_checkpoint()
        self._db.close()
        if problem is not None:
            raise StoreError(
                f"{self._db.path} closed uncleanly: {problem}; the next start replays its "
                "write-ahead log")

    def _final_checkpoint(self) -> str | None:
        """Checkpoint before closing; None when done (or only postponed), else why not."""
        if self._db.invalidated is not None and not self._db.reopen():
            return f"the database is unusable ({self._db.invalidated})"
        if not self.healthy and not self._writes_again():
            return "writes were failing, so no final checkpoint was attempted"
        if (room := self._db.room_for_checkpoint()) is not None:
            log.warning("closing without a final checkpoint: %s; the next start replays the "
                        "write-ahead log", room)
            return None
        return self._checkpoint()

    def _writes_again(self) -> bool:
        """One trivial write (the disk may have recovered since the last failure)."""
        try:
            self._apply([_Job(work=lambda db: db.execute(
                "UPDATE schema_version SET version = version").fetchall())])
        except Exception:
            return False
        return True

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        checkpoints = self._db.checkpoints
        last_checkpoint = time.monotonic()
        while True:
            wait: float | None = None  # failing writes: no checkpoint is due, wait for work
            if self._db.invalidated is not None:
                wait = _REOPEN_EVERY_S
            elif self.healthy:
                wait = max(0.0, last_checkpoint + checkpoints.interval_s - time.monotonic())
                if self._index:  # the trace index of the last spans, once quiet
                    wait = min(wait, traces.INDEX_EVERY_S)
            try:
                job = self._queue.get(timeout=wait)
            except queue.Empty:
                job = _IDLE
            if job is None:
                return
            stop = False
            jobs = [] if job is _IDLE else [job]
            while jobs and len(jobs) < _MAX_GROUP:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.append(more)
            if jobs:
                # Spans first, in a transaction of their own: their exporters wait for the
                # commit, and must not wait for the verdict writes queued among them (tens of ms
                # under load). Moving spans ahead of verdicts is safe: every verdict queued is
                # about spans committed before it was made; the rest keeps its order.
                spans = [j for j in jobs if j.spans is not None]
                rest = [j for j in jobs if j.spans is None]
                for group in (spans, rest) if spans and rest else (jobs,):
                    self._commit_group(group)
                settled = sum(len(j.verdicts) for j in jobs if j.verdicts is not None)
                if settled:
                    with self._pending_lock:
                        self._pending_verdicts -= settled
            elif self._db.invalidated is not None:
                self._reopen()  # idle: recover without waiting for traffic
            if stop:
                return
            if self._index.due() and self._queue.empty() and self.healthy:
                self._index_now()  # quiet now: the last spans' windows need no more company
            if (self._queue.empty() and self.healthy
                    and time.monotonic() - last_checkpoint >= checkpoints.interval_s):
                # Only when idle (a checkpoint holds the writer) and while writes succeed: a
                # checkpoint on a failing disk is what makes DuckDB invalidate the database.
                self._checkpoint()
                last_checkpoint = time.monotonic()

    def _index_now(self) -> None:
        """Write the remembered trace windows in a transaction of their own."""
        if not self._index:
            return
        try:
            self._writer.begin()
            self._index.write(self._writer)
            self._writer.commit()
        except duckdb.Error as exc:  # a start re-indexes the tail: nothing is lost
            with contextlib.suppress(duckdb.Error):
                self._writer.rollback()
            log.warning("writing the trace index failed: %s", first_line(exc))
    def _checkpoint(self) -> str | None:
        """Checkpoint now; None once done, else why not (logged once per kind of reason)."""
        problem = self._db.checkpoint()
        if problem is None:
            self._checkpoint_problem = None
            return None
        if self._db.invalidated is not None:
            self.healthy = False
            log.error("database %s invalidated by a failed checkpoint (%s); re-opening it "
                      "once the disk has room", self._db.path, self._db.invalidated)
        elif self._checkpoint_problem is None:  # said once, until a checkpoint succeeds
            log.warning("checkpoint postponed: %s", problem)
        self._checkpoint_problem = problem
        return problem

    def _reopen(self) -> bool:
        """Re-open an invalidated database (DuckDB replays its WAL); True once usable."""
        reason = self._db.invalidated
        if not self._db.reopen():
            return False
        self._known_resources.clear()  # lost with the transaction that was rolled back
        log.warning("database %s re-opened after it was invalidated (%s)", self._db.path, reason)
        return True

    def _commit_group(self, jobs: list[_Job]) -> None:
        if self._db.invalidated is not None and not self._reopen():
            self.healthy = False
            self._fail(jobs, f"database is unusable until it can be re-opened: "
                             f"{self._db.invalidated}")
            return
        try:
            results = self._apply(jobs)
        except Exception as exc:
            self._known_resources.clear()  # the rolled-back transaction may have added some
            if isinstance(exc, STORE_LEVEL_ERRORS):
                # The file or the disk failed, not a job: every job would fail the same way.
                self._store_failed(exc)
                self._fail(jobs, f"database write failed: {first_line(exc)}")
                return
            # One bad job must not fail the others: retry each in a transaction of its own.
            log.warning("group commit of %d jobs failed (%s); retrying one by one",
                        len(jobs), first_line(exc))
            for job in jobs:
                try:
                    (result,) = self._apply([job])
                except Exception as job_exc:
                    self._known_resources.clear()
                    if isinstance(job_exc, STORE_LEVEL_ERRORS):
                        self._store_failed(job_exc)
                    (job.done or _no_op)(
                        StoreError(f"database write failed: {first_line(job_exc)}"))
                else:
                    self.healthy = True
                    (job.done or _no_op)(result)
            return
        self.healthy = True
        for job, result in zip(jobs, results, strict=True):
            (job.done or _no_op)(result)

    def _store_failed(self, exc: Exception) -> None:
        self.healthy = False
        if isinstance(exc, duckdb.FatalException):
            self._db.invalidated = first_line(exc)
        log.error("database write failed: %s", first_line(exc))

    @staticmethod
    def _fail(jobs: list[_Job], message: str) -> None:
        for job in jobs:
            (job.done or _no_op)(StoreError(message))

    def _apply(self, jobs: list[_Job]) -> list[object]:
        if all(j.spans is not None for j in jobs):
            return self._append(jobs)
        db = self._writer
        started = time.perf_counter()
        db.begin()
        try:
            batches = [j.spans for j in jobs if j.spans is not None and len(j.spans)]
            if batches:
                self._insert_spans(batches)
            if self._index.due():
                self._index.write(db)
            results = self._run_work(db, jobs)
            db.commit()
        except BaseException:
            # A failed COMMIT has already ended the transaction: rolling back again would raise
            # "no transaction is active" and hide the real error (a full disk, say).
            with contextlib.suppress(duckdb.Error):
                db.rollback()
            raise
        self._on_commit(time.perf_counter() - started)
        return results

    def _append(self, jobs: list[_Job]) -> list[object]:
        """A group of exports alone, with no BEGIN and COMMIT around it: the spans INSERT is
        one statement, atomic and durable on its own (autocommit). Under load every call into
        DuckDB waits for the GIL: BEGIN, register and unregister took ~3 of the ~11 ms of a
        1,500-span group. What else the group writes is safe outside that statement: the due
        trace index goes first, in its own transaction (derived data: a failure is logged, a
        start rebuilds it), and new resource rows are committed before the spans that name
        them (content-addressed: one left by a failed INSERT is harmless). So a failure leaves
        none of the group's spans stored, and its jobs can be retried one by one."""
        started = time.perf_counter()
        if self._index.due():
            self._index_now()
        batches = [j.spans for j in jobs if j.spans is not None and len(j.spans)]
        if batches:
            self._insert_spans(batches)
        self._on_commit(time.perf_counter() - started)
        return [None] * len(jobs)

    def _run_work(self, db: duckdb.DuckDBPyConnection, jobs: list[_Job]) -> list[object]:
        """Each job's work in order; consecutive verdict batches are merged and written once
        (their jobs share the result)."""
        results: list[object] = []
        i = 0
        while i < len(jobs):
            job = jobs[i]
            if job.verdicts is None:
                results.append(job.work(db) if job.work is not None else None)
                i += 1
                continue
            merged = VerdictBatch()
            j = i
            while j < len(jobs) and jobs[j].verdicts is not None:
                batch = jobs[j].verdicts
                assert batch is not None
                merged.extend(batch)
                j += 1
            written = verdicts.write(db, merged)
            results.extend([written] * (j - i))
            i = j
        return results

    def _insert_spans(self, batches: list[SpanBatch]) -> None:
        new: dict[int, bytes] = {}
        for batch in batches:
            for i, raw in batch.resources().items():
                if i not in self._known_resources:
                    new[i] = raw
        if new:
            resources = pa.Table.from_arrays([list(new), list(new.values())],
                                             schema=_RESOURCE_SCHEMA)
            self._writer.register("incoming_resources", resources)
            try:
                self._writer.execute(
                    "INSERT INTO resources SELECT * FROM incoming_resources ON CONFLICT DO NOTHING")
            finally:
                self._writer.unregister("incoming_resources")
        # One Arrow table per batch (built from its column lists in C, or already built by a
        # decode worker), concatenated without a copy: no Python loop over the spans. Inserted
        # as a relation: one call into DuckDB where register, INSERT, unregister were three.
        self._writer.from_arrow(pa.concat_tables([b.table() for b in batches])).insert_into(
            "spans")
        for batch in batches:
            self._index.add(batch)
        # Marked known once the spans INSERT succeeded (committed, or in a transaction): if
        # that transaction rolls back, _commit_group clears the whole set, so a resource row is
        # never assumed that was not stored.
        if len(self._known_resources) > _MAX_KNOWN_RESOURCES:
            self._known_resources.clear()
        self._known_resources.update(new)

    # -- the notification outbox (see incidents/notify.py) --------------------------------

    async def mark_notification(
        self, row_id: int, *, sent: bool, at: datetime, error: str | None,
        next_attempt_at: datetime | None,
    ) -> None:
        """Record a delivery attempt. Conditional on the row not being sent already, so a
        second worker (or a retry after a restart) never counts a delivery twice."""
        # Every statement's result is fetched: a result left open on the writer's cursor is
        # suspected of failing the next statement of the group commit ("connection has an
        # unfinished result"), which is then retried job by job.
        if sent:
            await self.run(lambda db: db.execute(
                "UPDATE outbox SET status = 'sent', sent_at = ?, attempts = attempts + 1, "
                "last_error = NULL WHERE id = ? AND status <> 'sent'", [at, row_id]).fetchall())
        else:
            await self.run(lambda db: db.execute(
                "UPDATE outbox SET status = 'failed', attempts = attempts + 1, last_error = ?, "
                "next_attempt_at = ? WHERE id = ? AND status <> 'sent'",
                [error, next_attempt_at or at, row_id]).fetchall())

    def save_schedule_progress(self, progress: dict[str, datetime]) -> None:
        """Queue the progress; call it only once the failures of the slots it covers are
        queued, so that the writer's FIFO order stores them first."""
        def save(db: duckdb.DuckDBPyConnection) -> None:
            for rule, judged_until in progress.items():
                db.execute(
                    "INSERT INTO schedule_state VALUES (?, ?) ON CONFLICT (rule) "
                    "DO UPDATE SET judged_until = excluded.judged_until", [rule, judged_until])

        if progress:
            self.submit(save)


def _settle(future: asyncio.Future[object], result: object) -> None:
    if not future.done():
        future.set_result(result)


def _log_failure(result: object) -> None:
    if isinstance(result, BaseException):
        log.error("storing run verdicts failed: %s", result)


__all__ = ["Store", "VerdictBatch"]
