"""The DuckDB connection of one database file: open, checkpoint, re-open, close.

DuckDB turns a failed ``CHECKPOINT`` (a full disk, say) into a fatal error that *invalidates*
the database instance: every later statement fails until all its connections are closed and the
file is opened again, which replays the write-ahead log. Nothing committed is lost (a commit is
in the WAL before it returns, and the WAL is only truncated after a checkpoint succeeded), so a
store that re-opens once the disk has room again recovers without a restart.

Contract:

- ``Database(path)`` opens the file (schema created or checked) and checkpoints the WAL replayed
  at open only when the disk has room for it (see ``Checkpoints.reserve_bytes``); raises
  StoreError with the reason otherwise.
- ``cursor()`` (and any other connection method, forwarded) uses the current connection, so a
  reader that holds the Database keeps working after a re-open; a cursor taken before one fails.
- ``checkpoint()`` returns None on success, or why it was not done; a fatal failure marks the
  database ``invalidated``. ``reopen()`` closes every connection and opens the file again.
- ``close()`` closes the connection (it never checkpoints: that is ``Store.close``'s decision).

Timing and room are read from ``Checkpoints.from_env()``: hidden settings, so that tests of a
real process can checkpoint every 200 ms or force the checkpoint on a full disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from outcomewatch.errors import StoreError
from outcomewatch.store.schema import DDL, migrate, reindex_tail

log = logging.getLogger(__name__)

INTERVAL_ENV = "OUTCOMEWATCH_CHECKPOINT_INTERVAL_S"
RESERVE_ENV = "OUTCOMEWATCH_CHECKPOINT_RESERVE_BYTES"

# DuckDB's errors that say the database (its file, its memory) failed, not the statement:
# retrying the jobs of a group one by one cannot help, and the store is unhealthy.
STORE_LEVEL_ERRORS: tuple[type[duckdb.Error], ...] = (
    duckdb.IOException, duckdb.TransactionException, duckdb.FatalException,
    duckdb.OutOfMemoryException,
)


@dataclass(frozen=True)
class Checkpoints:
    """When the writer checkpoints: every ``interval_s`` when idle, and only with at least the
    WAL's size plus ``reserve_bytes`` free on the file's disk (None: always try)."""

    interval_s: float = 30.0
    reserve_bytes: int | None = 16 * 1024 * 1024

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Checkpoints:
        """The defaults, overridden by ``OUTCOMEWATCH_CHECKPOINT_INTERVAL_S`` (seconds > 0) and
        ``OUTCOMEWATCH_CHECKPOINT_RESERVE_BYTES`` (bytes >= 0, or ``off``); a bad value raises
        StoreError rather than being replaced by a default."""
        interval = environ.get(INTERVAL_ENV)
        reserve = environ.get(RESERVE_ENV)
        settings = cls()
        try:
            if interval is not None:
                seconds = float(interval)
                if not seconds > 0:
                    raise ValueError(interval)
                settings = cls(seconds, settings.reserve_bytes)
            if reserve is not None:
                room = None if reserve.strip().lower() == "off" else int(reserve)
                if room is not None and room < 0:
                    raise ValueError(reserve)
                settings = cls(settings.interval_s, room)
        except ValueError as exc:
            raise StoreError(f"invalid {INTERVAL_ENV} or {RESERVE_ENV}: {exc}") from exc
        return settings


def first_line(exc: BaseException) -> str:
    """An error's message on one line (DuckDB's fatal errors repeat the original on a second)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Database:
    """One DuckDB file and its current connection; ``writer`` is the writer thread's cursor."""

    def __init__(self, path: str, *, checkpoints: Checkpoints | None = None) -> None:
        self.path = path
        self.checkpoints = checkpoints or Checkpoints.from_env()
        self.invalidated: str | None = None  # why DuckDB invalidated the instance, until re-open
        self._lock = threading.Lock()  # guards swapping the connection against cursor()
        try:
            self._conn = self._open()
        except duckdb.Error as exc:
            raise StoreError(f"cannot open database {path}: {first_line(exc)}") from exc
        self.writer = self._conn.cursor()

    def _open(self) -> duckdb.DuckDBPyConnection:
        conn = duckdb.connect(self.path)
        try:
            # Checkpoint on our own schedule: the automatic one every 16 MB of WAL stalls inserts.
            conn.execute("SET checkpoint_threshold = '1GB'")
            conn.execute("SET TimeZone = 'UTC'")
            conn.execute(DDL)
            migrate(conn)
            reindex_tail(conn)
            # Checkpointed just below: a copy of the file alone then says a server had it open.
            conn.execute("DELETE FROM server_state")
            conn.execute("INSERT INTO server_state VALUES (true)")
            # DuckDB replays its WAL at open but does not checkpoint it: with frequent restarts
            # the WAL would only grow, and every start would replay more of it. On a nearly full
            # disk the checkpoint waits (the WAL is as durable), rather than failing the start.
            postponed = self._checkpoint_on(conn)
            if postponed:
                log.warning("opened %s without a checkpoint: %s", self.path, postponed)
        except BaseException:
            conn.close()
            raise
        return conn

    # -- what readers use -----------------------------------------------------------------

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of the current connection (thread-safe, as duckdb cursors are)."""
        with self._lock:
            return self._conn.cursor()

    def __getattr__(self, name: str) -> Any:
        # Anything else a caller expects of a connection (execute, ...) goes to the current one.
        if name.startswith("_"):  # not one of ours (or not set yet): never recurse
            raise AttributeError(name)
        return getattr(self._conn, name)

    # -- checkpoints ----------------------------------------------------------------------

    def room_for_checkpoint(self) -> str | None:
        """None when the disk has room for a checkpoint, else why it should wait."""
        if self.checkpoints.reserve_bytes is None:
            return None
        wal = Path(self.path + ".wal")
        try:
            wal_bytes = wal.stat().st_size if wal.exists() else 0
            free = shutil.disk_usage(Path(self.path).resolve().parent).free
        except OSError as exc:
            return f"cannot tell the free space: {exc}"
        if wal_bytes == 0:
            return None  # nothing to write: a checkpoint is a no-op
        need = wal_bytes + self.checkpoints.reserve_bytes
        if free < need:
            return (f"{free // 1024} KiB free, a checkpoint of the {wal_bytes // 1024} KiB "
                    f"write-ahead log needs {need // 1024} KiB")
        return None

    def _checkpoint_on(self, conn: duckdb.DuckDBPyConnection) -> str | None:
        if (postponed := self.room_for_checkpoint()) is not None:
            return postponed
        try:
            conn.execute("CHECKPOINT")
        except duckdb.FatalException as exc:
            self.invalidated = first_line(exc)
            raise
        return None

    def checkpoint(self) -> str | None:
        """Checkpoint on the writer's cursor: None once done, else why not (no room: postponed;
        an error: DuckDB's message, and ``invalidated`` is set if it was fatal)."""
        try:
            return self._checkpoint_on(self.writer)
        except duckdb.Error as exc:
            return f"checkpoint failed: {first_line(exc)}"

    # -- re-open and close ----------------------------------------------------------------

    def reopen(self) -> bool:
        """Close every connection and open the file again (DuckDB replays the WAL). True once
        the database is usable; False (still ``invalidated``) if it could not be opened yet."""
        with self._lock:
            if not self._close_connection():
                return False
            try:
                self._conn = self._open()
            except duckdb.Error as exc:
                self.invalidated = first_line(exc)
                # Keep a closed connection in place: readers get an error, not a stale instance.
                self._conn = _closed_connection()
                return False
            self.writer = self._conn.cursor()
            self.invalidated = None
            return True

    def _close_connection(self) -> bool:
        """Close the connection and its cursors. DuckDB refuses to close a connection while a
        reader thread is still inside a query: retry briefly, then report False."""
        for _ in range(100):
            try:
                self.writer.close()
                self._conn.close()
                return True
            except duckdb.Error:
                time.sleep(0.05)
        return False

    def close(self) -> None:
        with self._lock:
            if not self._close_connection():
                self._conn.close()  # let the error say why


def _closed_connection() -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect(":memory:")
    conn.close()
    return conn


__all__ = ["STORE_LEVEL_ERRORS", "Checkpoints", "Database", "first_line"]
