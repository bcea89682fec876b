"""Rate-limited logging of repeated warnings and errors: one line per second per kind, with a count.

A failure that repeats in a tight loop (asyncio's "socket.accept() out of system resource" when
the process is out of file descriptors, a disk that refuses every write) must not turn the log
into the outage: the first record of a kind is logged as it is; within the next ``every_s``
further records of that kind are counted, not written; the first one after that is written on
one line (no traceback), saying how many were suppressed.

A record's kind is its logger, level and the first line of its message template (asyncio puts
the socket, with its fd number, on the following lines), plus the exception type. Records below
WARNING pass untouched. ``install()`` puts the filter on every handler of the root logger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_MAX_KINDS = 1000  # kinds remembered; past it the table starts again (it only loses counts)


@dataclass
class _Seen:
    passed_at: float
    suppressed: int = 0


class RateLimit(logging.Filter):
    """A logging filter: at most one record per kind per ``every_s`` seconds."""

    def __init__(
        self, *, every_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.every_s = every_s
        self._clock = clock
        self._seen: dict[tuple[str, int, str, str], _Seen] = {}
        self._lock = threading.Lock()  # handlers call filters outside their own lock

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        with self._lock:
            return self._admit(record)

    def _admit(self, record: logging.LogRecord) -> bool:
        exc_type = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        kind = (record.name, record.levelno, str(record.msg).partition("\n")[0], exc_type)
        now = self._clock()
        seen = self._seen.get(kind)
        if seen is None:
            if len(self._seen) >= _MAX_KINDS:
                self._seen.clear()
            self._seen[kind] = _Seen(now)
            return True
        if now - seen.passed_at < self.every_s:
            seen.suppressed += 1
            return False
        suppressed, since = seen.suppressed, seen.passed_at
        seen.suppressed, seen.passed_at = 0, now
        if suppressed:
            _one_line(record, f" ({suppressed} more like this in the last {now - since:.1f}s)")
        return True


def _one_line(record: logging.LogRecord, note: str) -> None:
    """Rewrite ``record`` as its first message line, the exception's own line and ``note``."""
    message = record.getMessage().partition("\n")[0]
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        message += f": {type(exc).__name__}: {exc}"
    record.msg, record.args = message + note, None
    record.exc_info, record.exc_text, record.stack_info = None, None, None


def install(*, every_s: float = 1.0) -> RateLimit:
    """Put one RateLimit on every handler of the root logger (call after logging is set up)."""
    limit = RateLimit(every_s=every_s)
    for handler in logging.getLogger().handlers:
        handler.addFilter(limit)
    return limit


__all__ = ["RateLimit", "install"]
