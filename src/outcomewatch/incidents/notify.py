"""The outbox worker: delivers incident transitions to the targets of their route.

The store writes one outbox row per (transition, target) in the same transaction as the
transition itself, so a notification is never lost between "the incident changed" and "someone
was told". This worker reads due rows, posts them, and records the outcome. Delivery is at least
once: a row sent but not yet marked when the process dies is sent again after the restart
(receivers dedupe: Alertmanager by labels, webhooks by groupKey and transition).

Targets are independent. Each target (a route's ``alertmanager`` or ``webhook``) is a *lane*
with its own reads, its own requests in flight and its own backoff: a target that hangs or fails
delays only itself, never another route's or the other target of the same route. A lane that
fails as a whole (no connection, timeout, 5xx, or the store failing) pauses with exponential
backoff and logs one line per backoff step, with how many notifications it holds back.

Order: rows of one incident and one target are delivered in id order, one at a time, and a row
waits while an earlier one is unsent (failing, or not due yet), so a "resolved" never overtakes
its "opened". The firing alerts of an Alertmanager target are re-sent (``resend_every``) by its
own lane, after its outbox rows, in one request: as Prometheus does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Protocol

import httpx

from outcomewatch.clock import Clock
from outcomewatch.config import AlertmanagerTarget, NotifyConfig
from outcomewatch.incidents.senders import (
    DeliveryError,
    alertmanager_alert,
    firing_horizon,
    post_alerts,
    send_alertmanager,
    send_webhook,
)
from outcomewatch.model import OutboxRow

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500
DEFAULT_CONCURRENCY = 8  # incidents delivered at once to one target
RESEND_CHUNK = 1000  # firing alerts per re-send request (bounds one request's size)


class OutboxStore(Protocol):
    def due_notifications(
        self, now: datetime, limit: int, *, route: str | None = None, target: str | None = None,
        exclude: Collection[tuple[str, str]] = (),
    ) -> list[OutboxRow]:
        """Rows pending or failed with next_attempt_at <= now, by id (a blocking DB read),
        leaving out every row behind an unsent earlier row of its incident and target (this is
        what keeps a "resolved" from overtaking its "opened"); only ``route``'s / ``target``'s
        rows if given, none of the (route, target) pairs in ``exclude``."""
        ...

    def firing_incidents(self) -> list[dict[str, Any]]:
        """Snapshots of the incidents open or acknowledged (a blocking DB read)."""
        ...

    async def mark_notification(
        self,
        row_id: int,
        *,
        sent: bool,
        at: datetime,
        error: str | None,
        next_attempt_at: datetime | None,
    ) -> None:
        """sent: status 'sent', sent_at=at. Else status 'failed', attempts+1, last_error=error,
        next_attempt_at."""
        ...


def backoff_delay(attempt: int, base: timedelta, maximum: timedelta) -> timedelta:
    """The wait after the ``attempt``-th failed attempt (1-based): base * 2**(attempt-1), at most
    ``maximum``."""
    try:
        delay: timedelta = base * 2 ** max(attempt - 1, 0)
    except OverflowError:  # timedelta's range ends near 2.7 million years
        return maximum
    return min(delay, maximum)


@dataclass
class _Lane:
    """One target's delivery state. ``target`` "" is the lane of rows whose route or target is
    not in the config (they fail, and are retried, without holding up any configured lane)."""

    route: str
    target: str
    failures: int = 0  # consecutive failed rounds
    paused_until: datetime | None = None
    last_resend: datetime | None = None
    task: asyncio.Task[int] | None = None

    @property
    def name(self) -> str:
        return f"{self.target} of route {self.route!r}" if self.target else "unrouted rows"

    def ready(self, now: datetime) -> bool:
        return self.paused_until is None or now >= self.paused_until


@dataclass
class _Round:
    """What one pass over a lane's due rows did."""

    sent: int = 0
    failed: int = 0
    held: int = 0  # due rows not attempted because the target went down
    target_down: bool = False
    first_error: str | None = None


class Notifier:
    """Delivers due outbox rows to the targets configured for their route.

    A row whose route, or whose target within the route, is not in the config is marked failed
    ("route 'x' has no alertmanager target") and retried with the same backoff as a receiver
    error rather than dropped: the config is read at startup, and a restart with the route
    restored delivers it. Its later rows wait behind it, as behind any failing row.

    ``client`` is used as given and left open; without one the Notifier makes its own, closed by
    ``aclose()`` (or ``async with``).
    """

    def __init__(
        self,
        store: OutboxStore,
        config: NotifyConfig,
        *,
        clock: Clock,
        client: httpx.AsyncClient | None = None,
        backoff_base: timedelta = timedelta(seconds=1),
        backoff_max: timedelta = timedelta(minutes=5),
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        on_attempt: Callable[[str, bool], None] | None = None,
    ) -> None:
        """``on_attempt(target, delivered)`` is called after every request made or refused
        (metrics): one per outbox row, one per re-send request."""
        self._on_attempt = on_attempt or (lambda target, delivered: None)
        self._store = store
        self._config = config
        self._clock = clock
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._batch_size = batch_size
        self._concurrency = concurrency
        self._lanes = {
            (route, target): _Lane(route, target)
            for route in config.routes for target in config.targets_for(route)
        }
        self._unrouted = _Lane("", "")
        self._woken = asyncio.Event()
        quiet_httpx()

    async def __aenter__(self) -> Notifier:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def _all_lanes(self) -> list[_Lane]:
        return [*self._lanes.values(), self._unrouted]

    async def run_once(self) -> int:
        """One round on every target that is not backing off: its due rows, in order within
        each incident, until none is left or one fails, then its re-send if one is due. The
        number of rows delivered. A store error propagates, after every lane has finished what
        it had under way (so no delivery goes unrecorded); receiver errors never do."""
        now = self._clock()
        lanes = [lane for lane in self._all_lanes() if lane.ready(now)]
        results = await asyncio.gather(
            *(self._lane_round(lane, now) for lane in lanes), return_exceptions=True
        )
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            raise errors[0]
        return sum(result for result in results if isinstance(result, int))

    async def run_forever(self, *, interval: timedelta = timedelta(seconds=1)) -> None:
        """Every ``interval``, start a round on each target that is idle and not backing off;
        never wait for a busy one. Runs until cancelled (which cancels the rounds under way: an
        unrecorded send is repeated after a restart). Errors are logged, never raised."""
        try:
            while True:
                now = self._clock()
                for lane in self._all_lanes():
                    if lane.task is None and lane.ready(now):
                        lane.task = asyncio.create_task(self._lane_round(lane, now))
                        lane.task.add_done_callback(functools.partial(self._ended, lane))
                self._woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), interval.total_seconds())
        finally:
            tasks = [lane.task for lane in self._all_lanes() if lane.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        """Start the next round of ``run_forever`` now rather than at the next interval: call
        it (on the notifier's event loop) once a transition's outbox rows are committed, and a
        new notification goes out in milliseconds instead of up to ``interval``."""
        self._woken.set()

    def _ended(self, lane: _Lane, _: object) -> None:
        task, lane.task = lane.task, None
        if task is None or task.cancelled():
            return
        error = task.exception()
        if error is not None:  # the store failed (a full disk): back off, one line per step
            self._fail_lane(lane, self._clock(), f"{type(error).__name__}: {error}", held=None)

    async def _lane_round(self, lane: _Lane, now: datetime) -> int:
        """Deliver the lane's due rows, read after read while something goes out (a delivered
        row may unblock the next of its incident), then re-send its firing alerts if due. Rows
        delivered."""
        sent = 0
        while True:
            rows = await asyncio.to_thread(self._due_rows, lane, now)
            outcome = await self._deliver(lane, rows)
            sent += outcome.sent
            if outcome.failed:
                at = self._clock()
                if outcome.target_down:
                    self._fail_lane(lane, at, outcome.first_error or "", held=outcome.held)
                    return sent
                log.warning("%s: %d of %d notifications refused, each retried with backoff: %s",
                            lane.name, outcome.failed, len(rows), outcome.first_error)
            elif outcome.sent:
                lane.failures = 0
            if outcome.sent == 0:
                break
            now = self._clock()
        await self._resend_if_due(lane, self._clock())
        return sent

    def _fail_lane(self, lane: _Lane, at: datetime, error: str, *, held: int | None) -> None:
        lane.failures += 1
        delay = backoff_delay(lane.failures, self._backoff_base, self._backoff_max)
        lane.paused_until = at + delay
        waiting = f"; {held} more waiting" if held else ""
        log.warning("%s failed (%d in a row%s), next attempt in %s: %s",
                    lane.name, lane.failures, waiting, delay, error)

    def _due_rows(self, lane: _Lane, now: datetime) -> list[OutboxRow]:
        if lane.target:
            return self._store.due_notifications(
                now, self._batch_size, route=lane.route, target=lane.target)
        return self._store.due_notifications(now, self._batch_size, exclude=list(self._lanes))

    async def _deliver(self, lane: _Lane, rows: list[OutboxRow]) -> _Round:
        outcome = _Round()
        sequences: dict[int, list[OutboxRow]] = {}
        for row in sorted(rows, key=lambda r: r.id):
            sequences.setdefault(row.incident_id, []).append(row)
        slots = asyncio.Semaphore(self._concurrency)
        results = await asyncio.gather(
            *(self._deliver_sequence(sequence, slots, outcome) for sequence in sequences.values()),
            return_exceptions=True,
        )
        # gather waits for every sequence, so one store error does not cancel a request in
        # flight (whose outcome would then go unrecorded and the row be sent twice).
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            raise errors[0]
        return outcome

    async def _deliver_sequence(
        self, rows: list[OutboxRow], slots: asyncio.Semaphore, outcome: _Round
    ) -> None:
        """Deliver ``rows`` (one incident, by id) until one fails or the target goes down."""
        async with slots:
            for index, row in enumerate(rows):
                if outcome.target_down:
                    outcome.held += len(rows) - index
                    return
                error, down = await self._attempt(row)
                self._on_attempt(row.target, error is None)
                at = self._clock()
                if error is None:
                    await self._store.mark_notification(
                        row.id, sent=True, at=at, error=None, next_attempt_at=None
                    )
                    outcome.sent += 1
                    continue
                outcome.failed += 1
                outcome.target_down = outcome.target_down or down
                if outcome.first_error is None:
                    outcome.first_error = (f"notification {row.id} (incident {row.incident_id}, "
                                           f"{row.transition}): {error}")
                delay = backoff_delay(row.attempts + 1, self._backoff_base, self._backoff_max)
                await self._store.mark_notification(
                    row.id, sent=False, at=at, error=error, next_attempt_at=at + delay
                )
                return

    async def _attempt(self, row: OutboxRow) -> tuple[str | None, bool]:
        """Send ``row`` once: (None, False) if delivered, else (why not, whether the target
        itself is down)."""
        route = self._config.routes.get(row.route)
        if route is None:
            return f"route {row.route!r} is not configured", False
        external_url = self._config.external_url
        try:
            if row.target == "alertmanager":
                if route.alertmanager is None:
                    return f"route {row.route!r} has no alertmanager target", False
                await send_alertmanager(
                    self._client, route.alertmanager, row.payload,
                    transition=row.transition, external_url=external_url, now=self._clock(),
                )
            elif row.target == "webhook":
                if route.webhook is None:
                    return f"route {row.route!r} has no webhook target", False
                await send_webhook(
                    self._client, route.webhook, row.payload,
                    transition=row.transition, route=row.route, external_url=external_url,
                )
            else:
                return f"unknown target {row.target!r}", False
        except DeliveryError as exc:
            return str(exc), exc.target_down
        except Exception as exc:
            # A bug or a malformed snapshot must not stop the worker; the row keeps the reason.
            log.exception("notification %d could not be built", row.id)
            return f"internal error: {type(exc).__name__}: {exc}", False
        return None, False

    # -- re-sending firing alerts -------------------------------------------------------------

    def _resend_target(self, lane: _Lane) -> AlertmanagerTarget | None:
        route = self._config.routes.get(lane.route)
        if lane.target != "alertmanager" or route is None or route.alertmanager is None:
            return None
        return route.alertmanager if route.alertmanager.resend_every is not None else None

    async def _resend_if_due(self, lane: _Lane, now: datetime) -> None:
        """Post the firing alert of every open or acknowledged incident of the lane's route
        again, in one request, once ``resend_every`` has passed since the last re-send (or
        since the lane's first round). Outside the outbox on purpose: a re-send is a refresh,
        idempotent for Alertmanager (same labels), not a transition."""
        target = self._resend_target(lane)
        if target is None or target.resend_every is None or not lane.ready(now):
            return
        if lane.last_resend is None:
            lane.last_resend = now  # the transitions themselves have just been posted
            return
        if now - lane.last_resend < target.resend_every:
            return
        firing = await asyncio.to_thread(self._store.firing_incidents)
        alerts = [
            alertmanager_alert(payload, transition="firing", now=now,
                               external_url=self._config.external_url,
                               horizon=firing_horizon(target))
            for payload in firing if payload.get("route") == lane.route
        ]
        for start in range(0, len(alerts), RESEND_CHUNK):
            try:
                await post_alerts(self._client, target, alerts[start:start + RESEND_CHUNK])
            except DeliveryError as exc:
                self._on_attempt("alertmanager", False)
                self._fail_lane(lane, self._clock(),
                                f"re-sending {len(alerts)} firing alerts: {exc}", held=None)
                return
            self._on_attempt("alertmanager", True)
        lane.last_resend = now
        lane.failures = 0


def quiet_httpx() -> None:
    """httpx logs every request at INFO: one line per notification and re-send, drowning what
    matters. Raised to WARNING unless someone set its level on purpose."""
    logger = logging.getLogger("httpx")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


__all__ = ["Notifier", "OutboxRow", "OutboxStore", "backoff_delay", "quiet_httpx"]
