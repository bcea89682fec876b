"""Where the running rules come from: the rule files, loaded at start and again on a reload
(``SIGHUP``, ``POST /api/v1/rules/reload``, or a rule file added, removed or changed: polled,
which needs no extra dependency and works the same on network file systems and in containers).

An invalid set is rejected with its problems and the running rules stay; a valid one is handed
to ``on_load`` (the engine takes it for new spans; open runs keep the rule they were opened
with). One reload at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from outcomewatch.clock import Clock, system_clock
from outcomewatch.errors import Problem, RuleError
from outcomewatch.rules.load import load_rules, rule_files
from outcomewatch.rules.match import RuleSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadResult:
    """``problems`` is empty when the new rules were taken into use."""

    rules: int
    problems: Sequence[Problem]
    loaded_at: datetime


class RuleSource:
    """The rule files at ``paths``; raises RuleError at construction when they are invalid."""

    def __init__(
        self, paths: Sequence[str], *, clock: Clock = system_clock,
        on_load: Callable[[RuleSet], None] = lambda rules: None,
        on_reload: Callable[[bool, datetime], None] = lambda ok, at: None,
    ) -> None:
        self.paths = list(paths)
        self._clock = clock
        self._on_load = on_load
        self._on_reload = on_reload
        self.rules: RuleSet = load_rules(self.paths)
        self.loaded_at = clock()
        self._seen = self._signature()
        self._lock = asyncio.Lock()
        self.last_reload: ReloadResult | None = None  # the latest reload, rejected or not

    def files(self) -> list[str]:
        """The rule files loaded (or that a reload would load)."""
        with contextlib.suppress(RuleError):
            return [str(path) for path in rule_files(self.paths)]
        return []

    async def reload(self) -> ReloadResult:
        async with self._lock:
            signature = await asyncio.to_thread(self._signature)
            try:
                rules = await asyncio.to_thread(load_rules, self.paths)
            except RuleError as exc:
                log.error("rule reload rejected, %d problem(s); the old rules keep running:\n%s",
                          len(exc.problems), exc)
                self._seen = signature
                self._on_reload(False, self._clock())
                self.last_reload = ReloadResult(len(self.rules.rules), exc.problems,
                                                self.loaded_at)
                return self.last_reload
            self.rules = rules
            self._on_load(rules)
            self.loaded_at = self._clock()
            self._seen = signature
            self._on_reload(True, self.loaded_at)
            log.info("reloaded %d rules", len(rules.rules))
            self.last_reload = ReloadResult(len(rules.rules), (), self.loaded_at)
            return self.last_reload

    def _signature(self) -> tuple[tuple[str, int, int], ...]:
        try:
            files = rule_files(self.paths)
        except RuleError:
            return ()
        signature = []
        for path in files:
            with contextlib.suppress(OSError):
                stat = path.stat()
                signature.append((str(path), stat.st_mtime_ns, stat.st_size))
        return tuple(signature)

    async def watch(self, interval: timedelta) -> None:
        """Reload whenever the files change; runs until cancelled."""
        while True:
            await asyncio.sleep(interval.total_seconds())
            if await asyncio.to_thread(self._signature) != self._seen:
                try:
                    await self.reload()
                except Exception:  # the watcher must outlive any one bad reload
                    log.exception("rule reload failed")
