"""What the command line's flags accept, as argparse types (each raising ArgumentTypeError with
one line saying what was expected), and the defaults derived from the machine (the memory a
process may use, as a container sees it).
"""

from __future__ import annotations

import argparse
import os
import re
from datetime import timedelta
from pathlib import Path

from outcomewatch.durations import parse_duration
from outcomewatch.errors import DurationError


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT``; raises ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid address {text!r}: expected HOST:PORT, like 127.0.0.1:4317")
    return host.strip("[]"), int(port)


def address_arg(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def duration_arg(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def positive_int_arg(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def workers_arg(text: str) -> int:
    from outcomewatch.receiver.decode_pool import auto_workers

    if text == "auto":
        return auto_workers()
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of workers, got {text!r}")
    return int(text)


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?)?b?", re.IGNORECASE)
_UNIT = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
         "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes from ``512MiB``, ``2GB``, ``1.5GiB`` or a plain number of bytes (units are
    case-insensitive; KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024); ValueError if not."""
    match = _SIZE.fullmatch(text.strip())
    size = 0 if match is None else int(float(match[1]) * _UNIT[(match[2] or "").lower()])
    if size < 1:
        raise ValueError(f"invalid size {text!r}: expected bytes, like 512MiB or 2GB")
    return size


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


LIVE_SHARE = 4  # the default live-state budget is a quarter of the memory the process may use
MIN_LIVE_BYTES = 64 * 2**20


def memory_limit_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The memory this process may use: the machine's, or its cgroup's limit when lower
    (cgroup v2 ``memory.max``, v1 ``memory/memory.limit_in_bytes``), as a container sees it."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in (cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit; v1 says so with a huge number
            limit = min(limit, int(text))
    return limit


def default_live_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The live-state budget when ``--max-live-bytes`` is not given: a quarter of
    ``memory_limit_bytes`` (the rest is DuckDB's, the queues' and Python's), at least 64 MiB.
    Like the Collector's memory_limiter, derived from the machine unless set."""
    return max(memory_limit_bytes(cgroup) // LIVE_SHARE, MIN_LIVE_BYTES)


def retention_arg(text: str) -> timedelta | None:
    """A duration, or ``forever`` (None: never delete)."""
    return None if text.strip().lower() == "forever" else duration_arg(text)
