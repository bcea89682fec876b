"""The DuckDB writer: one thread owns every write, fed by a bounded queue, committing in groups.

Why one writer: DuckDB serialises writers anyway, and a single thread lets concurrent exports
share one transaction (group commit) so an acknowledgement costs one commit, not one per request.
Spans go in as one Arrow table per commit, never a row per INSERT.

Contract: ``await store.append_spans(batch)`` returns once the spans are committed (the export
may then be acknowledged); it raises Overloaded when the queue is full and StoreError when the
database fails. Verdicts are stored with conditional updates (``WHERE status = 'open'``), so a
verdict given twice (a restart, a re-sent trigger) is stored once and counted in an incident once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa

from outcomewatch.errors import Overloaded, StoreError
from outcomewatch.otlp import SpanBatch
from outcomewatch.store import incidents, verdicts
from outcomewatch.store.schema import DDL, migrate, reindex_tail
from outcomewatch.store.server_reads import ServerReads
from outcomewatch.store.verdicts import VerdictBatch

log = logging.getLogger(__name__)

_SPAN_SCHEMA = pa.schema([
    ("trace_id", pa.string()), ("span_id", pa.string()), ("parent_span_id", pa.string()),
    ("name", pa.string()), ("service", pa.string()), ("scope", pa.string()),
    ("kind", pa.int8()), ("start_ns", pa.int64()), ("end_ns", pa.int64()),
    ("status_code", pa.int8()), ("status_message", pa.string()), ("received_ns", pa.int64()),
    ("span", pa.binary()), ("resource_id", pa.int64()),
])

_RESOURCE_SCHEMA = pa.schema([("id", pa.int64()), ("resource", pa.binary())])


_TRACE_INDEX_SCHEMA = pa.schema([("trace_id", pa.string()), ("first_received_ns", pa.int64()),
                                 ("last_received_ns", pa.int64())])
_INDEX_EVERY_S = 0.5  # how often the trace index is written (see store/traces.py)

_MAX_GROUP = 256  # jobs per transaction; bounds the latency one commit adds
_CHECKPOINT_EVERY_S = 30.0
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


class Store(ServerReads):
    """Owns the database file: schema, the writer thread, and the connection readers cursor from.
    The reads the server itself needs (recovery, evidence, the outbox) are in ServerReads."""

    def __init__(
        self, path: str, *, max_queue: int = 1024,
        on_commit: Callable[[float], None] | None = None,
    ) -> None:
        try:
            self.conn = duckdb.connect(path)
            # Checkpoint on our own schedule: the automatic one every 16 MB of WAL stalls inserts.
            self.conn.execute("SET checkpoint_threshold = '1GB'")
            self.conn.execute("SET TimeZone = 'UTC'")
            self.conn.execute(DDL)
            migrate(self.conn)
            reindex_tail(self.conn)
            # Checkpointed just below: a copy of the file alone then says a server had it open.
            self.conn.execute("DELETE FROM server_state")
            self.conn.execute("INSERT INTO server_state VALUES (true)")
            # DuckDB replays its WAL at open but does not checkpoint it: with frequent restarts
            # the WAL would only grow, and every start would replay more of it.
            self.conn.execute("CHECKPOINT")
        except duckdb.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
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
        self._unindexed: dict[str, list[int]] = {}  # trace id -> [first, last] received_ns
        self._indexed_at = time.monotonic()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._writer = self.conn.cursor()
        self._thread = threading.Thread(target=self._run, name="duckdb-writer", daemon=True)
        self._thread.start()
        self.healthy = True

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

        A reader thread may still be finishing a query (a cancelled task does not stop the
        thread it awaited), and DuckDB refuses to close a busy connection: retry briefly."""
        self._queue.put(None)
        self._thread.join()
        self._index_now()
        with contextlib.suppress(duckdb.Error):
            self._writer.execute("UPDATE server_state SET running = false")
        self._checkpoint()
        self._writer.close()
        for _ in range(100):
            try:
                self.conn.close()
                return
            except duckdb.Error:
                time.sleep(0.05)
        self.conn.close()

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        last_checkpoint = time.monotonic()
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            stop = False
            while len(jobs) < _MAX_GROUP:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.append(more)
            self._commit_group(jobs)
            settled = sum(len(j.verdicts) for j in jobs if j.verdicts is not None)
            if settled:
                with self._pending_lock:
                    self._pending_verdicts -= settled
            if stop:
                return
            if (self._unindexed and self._queue.empty()
                    and time.monotonic() - self._indexed_at > _INDEX_EVERY_S):
                self._index_now()  # quiet now: the last spans' windows need no more company
            if self._queue.empty() and time.monotonic() - last_checkpoint > _CHECKPOINT_EVERY_S:
                # Only when idle: a checkpoint holds the writer, so it waits for a quiet moment.
                self._checkpoint()
                last_checkpoint = time.monotonic()

    def _index_now(self) -> None:
        """Write the remembered trace windows in a transaction of their own."""
        if not self._unindexed:
            return
        try:
            self._writer.begin()
            self._write_index()
            self._writer.commit()
        except duckdb.Error as exc:  # a start re-indexes the tail: nothing is lost
            with contextlib.suppress(duckdb.Error):
                self._writer.rollback()
            log.warning("writing the trace index failed: %s", exc)

    def _checkpoint(self) -> None:
        try:
            self._writer.execute("CHECKPOINT")
        except duckdb.Error as exc:
            log.warning("checkpoint failed: %s", exc)

    def _commit_group(self, jobs: list[_Job]) -> None:
        try:
            results = self._apply(jobs)
        except Exception:
            self._known_resources.clear()  # the rolled-back transaction may have added some
            # One bad job must not fail the others: retry each in a transaction of its own.
            log.warning("group commit of %d jobs failed; retrying one by one", len(jobs))
            for job in jobs:
                try:
                    (result,) = self._apply([job])
                except Exception as exc:
                    self.healthy = False
                    (job.done or _no_op)(StoreError(f"database write failed: {exc}"))
                else:
                    self.healthy = True
                    (job.done or _no_op)(result)
            return
        self.healthy = True
        for job, result in zip(jobs, results, strict=True):
            (job.done or _no_op)(result)

    def _apply(self, jobs: list[_Job]) -> list[object]:
        db = self._writer
        started = time.perf_counter()
        db.begin()
        try:
            batches = [j.spans for j in jobs if j.spans is not None and len(j.spans)]
            if batches:
                self._insert_spans(batches)
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

    def _to_index(self, batch: SpanBatch) -> None:
        """Remember the batch's traces for the next index write (a few dict lookups per trace:
        the spans of one trace sit together in a request)."""
        windows = self._unindexed
        received = batch.received_ns
        last = None
        for trace_id in batch.trace_id:
            if trace_id == last:
                continue
            last = trace_id
            window = windows.get(trace_id)
            if window is None:
                windows[trace_id] = [received, received]
            elif received > window[1]:
                window[1] = received
            elif received < window[0]:
                window[0] = received

    def _write_index(self) -> None:
        """Append the remembered windows to trace_index, in the current transaction. Written
        with spans already committed before: if this transaction rolls back, a start re-indexes
        the tail (schema.reindex_tail)."""
        self._indexed_at = time.monotonic()
        if not self._unindexed:
            return
        windows, self._unindexed = self._unindexed, {}
        table = pa.Table.from_arrays(
            [list(windows), [w[0] for w in windows.values()], [w[1] for w in windows.values()]],
            schema=_TRACE_INDEX_SCHEMA)
        self._writer.register("incoming_index", table)
        try:
            self._writer.execute("INSERT INTO trace_index SELECT * FROM incoming_index")
        finally:
            self._writer.unregister("incoming_index")

    def _insert_spans(self, batches: list[SpanBatch]) -> None:
        def column(name: str) -> list[Any]:
            return [v for b in batches for v in getattr(b, name)]

        received = [b.received_ns for b in batches for _ in range(len(b))]
        # The spans of one resource share one bytes object, so this dict is a handful of entries
        # and each lookup an identity hit.
        resource_ids: dict[bytes, int] = {}
        for raw_resource in column("raw_resource"):
            if raw_resource not in resource_ids:
                resource_ids[raw_resource] = resource_id(raw_resource)
        new = [(i, raw) for raw, i in resource_ids.items() if i not in self._known_resources]
        if new:
            resources = pa.Table.from_arrays(
                [[i for i, _ in new], [raw for _, raw in new]], schema=_RESOURCE_SCHEMA)
            self._writer.register("incoming_resources", resources)
            try:
                self._writer.execute(
                    "INSERT INTO resources SELECT * FROM incoming_resources ON CONFLICT DO NOTHING")
            finally:
                self._writer.unregister("incoming_resources")
        incoming = pa.Table.from_arrays(
            [
                column("trace_id"), column("span_id"), column("parent_span_id"), column("name"),
                column("service"), column("scope"), column("kind"), column("start_ns"),
                column("end_ns"), column("status_code"), column("status_message"), received,
                column("raw"), [resource_ids[r] for r in column("raw_resource")],
            ],
            schema=_SPAN_SCHEMA,
        )
        self._writer.register("incoming_spans", incoming)
        try:
            self._writer.execute("INSERT INTO spans SELECT * FROM incoming_spans")
        finally:
            self._writer.unregister("incoming_spans")
        for batch in batches:
            self._to_index(batch)
        if time.monotonic() - self._indexed_at > _INDEX_EVERY_S:
            self._write_index()
        # Marked known before the commit: if the transaction rolls back, _commit_group clears
        # the whole set, so a resource row is never assumed that was not stored.
        if len(self._known_resources) > _MAX_KNOWN_RESOURCES:
            self._known_resources.clear()
        self._known_resources.update(i for i, _ in new)

    # -- the notification outbox (see incidents/notify.py) --------------------------------

    async def mark_notification(
        self, row_id: int, *, sent: bool, at: datetime, error: str | None,
        next_attempt_at: datetime | None,
    ) -> None:
        """Record a delivery attempt. Conditional on the row not being sent already, so a
        second worker (or a retry after a restart) never counts a delivery twice."""
        if sent:
            await self.run(lambda db: db.execute(
                "UPDATE outbox SET status = 'sent', sent_at = ?, attempts = attempts + 1, "
                "last_error = NULL WHERE id = ? AND status <> 'sent'", [at, row_id]))
        else:
            await self.run(lambda db: db.execute(
                "UPDATE outbox SET status = 'failed', attempts = attempts + 1, last_error = ?, "
                "next_attempt_at = ? WHERE id = ? AND status <> 'sent'",
                [error, next_attempt_at or at, row_id]))

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

def resource_id(raw_resource: bytes) -> int:
    """A stable 63-bit id for a serialised resource (the same bytes, the same id, any process)."""
    return int.from_bytes(hashlib.blake2b(raw_resource, digest_size=8).digest(), "big") >> 1


def _settle(future: asyncio.Future[object], result: object) -> None:
    if not future.done():
        future.set_result(result)


def _log_failure(result: object) -> None:
    if isinstance(result, BaseException):
        log.error("storing run verdicts failed: %s", result)


__all__ = ["Store", "VerdictBatch"]
