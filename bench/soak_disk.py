"""The disk-full phase of bench/soak.py: the database file and its WAL on a tmpfs the soak
mounts, filled to the last block mid-soak for a while, then freed; and how the server recovers.

Contract: :func:`require_root` exits with one line unless root; :func:`mount` mounts a fresh
tmpfs of ``size_mib`` at ``path`` (root only, likewise) and :func:`unmount` takes it away.
:class:`DiskFullPhase` is driven by the soak's loop: ``tick(now)`` (monotonic seconds) never
blocks longer than one /readyz request (2 s at most) plus the filling. At ``start_at`` it fills
the disk; ``full_for`` seconds later it frees it and then watches, without restarting anything,
for /readyz to answer 200 and for the first export acknowledged after the freeing. While
``active`` the soak must not kill the server (a restart would measure a start on a full disk,
not a recovery). ``done`` once both were seen or ``give_up_s`` after the freeing; ``recovered``
tells which. The load keeps sending throughout: exports refused while full (``UNAVAILABLE``) are
re-sent by the soak's workers.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx


def require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("soak: --disk-full needs root (it mounts a tmpfs for the database)")


def mount(path: Path, size_mib: int) -> None:
    require_root()
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
                   check=True)


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


class Filler:
    """A file that takes every free block of the disk, until freed."""

    def __init__(self, disk: Path) -> None:
        self.path = disk / "filler"
        self._file: BinaryIO | None = self.path.open("wb", buffering=0)
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            while free_bytes(disk) >= size:
                try:
                    self._file.write(b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        self.size = self.path.stat().st_size

    def free(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.path.unlink()


@dataclass
class DiskFullPhase:
    disk: Path
    began: float  # monotonic time the soak began (for the summary)
    start_at: float
    full_for: float
    api: Callable[[], str]  # the server's API base URL
    refusals: Callable[[], Counter[str]]  # the load's refused attempts so far, by gRPC code
    last_ack: Callable[[], float]  # monotonic time of the load's latest acknowledgement
    give_up_s: float = 120.0
    filler: Filler | None = None
    filled_at: float = 0.0
    freed_at: float = 0.0
    filler_bytes: int = 0
    readyz_503_seen: bool = False
    refused_while_full: Counter[str] = field(default_factory=Counter)
    ready_after: float | None = None
    acked_after: float | None = None
    done: bool = False
    _refusals_before: Counter[str] = field(default_factory=Counter)

    @property
    def active(self) -> bool:
        return self.filled_at > 0 and not self.done

    @property
    def recovered(self) -> bool:
        return self.ready_after is not None and self.acked_after is not None

    def _ready(self) -> int:
        try:
            return httpx.get(f"{self.api()}/readyz", timeout=2).status_code
        except httpx.HTTPError:
            return 0

    def tick(self, now: float) -> None:
        if self.done or now < self.start_at:
            return
        if self.filler is None and not self.freed_at:
            self._refusals_before = self.refusals()
            self.filler = Filler(self.disk)
            self.filled_at, self.filler_bytes = now, self.filler.size
            return
        if self.filler is not None:
            if self._ready() == 503:
                self.readyz_503_seen = True
            if now - self.filled_at < self.full_for:
                return
            self.filler.free()
            self.filler = None
            self.freed_at = now
            self.refused_while_full = self.refusals() - self._refusals_before
            return
        if self.ready_after is None and self._ready() == 200:
            self.ready_after = now - self.freed_at
        if self.acked_after is None and self.last_ack() > self.freed_at:
            self.acked_after = self.last_ack() - self.freed_at
        self.done = self.recovered or now - self.freed_at > self.give_up_s

    def close(self) -> None:
        if self.filler is not None:
            self.filler.free()
            self.filler = None

    def summary(self) -> str:
        if not self.filled_at:
            return "disk full: never reached (the soak ended before --disk-full-at)"

        def seconds(value: float | None) -> str:
            return "never" if value is None else f"{value:.1f}s"

        return (f"disk full: {self.filler_bytes / 2**20:.0f} MiB filler from t="
                f"{self.filled_at - self.began:.0f}s for "
                f"{self.freed_at - self.filled_at:.1f}s; /readyz 503 seen: "
                f"{self.readyz_503_seen}; refused while full {dict(self.refused_while_full) or 0}"
                f"; after freeing: /readyz 200 in {seconds(self.ready_after)}, first export "
                f"acknowledged in {seconds(self.acked_after)} (no restart)")
