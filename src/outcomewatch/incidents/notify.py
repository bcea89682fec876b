"""The outbox worker: delivers incident transitions to the targets of their route.

The store writes one outbox row per (transition, target) in the same transaction as the
transition itself, so a notification is never lost between "the incident changed" and "someone
was told". This worker reads due rows, posts them, and records the outcome. Delivery is at least
once: a row sent but not yet marked when the process dies is sent again after the restart
(receivers dedupe: Alertmanager by labels, webhooks by groupKey and transition).

Order: rows of one incident and one target are delivered in id order, one at a time, and a row
waits while an earlier one is unsent (failing, or not due yet), so a "resolved" never overtakes
its "opened". Different incidents, and the two targets of one incident, are independent: a dead
webhook delays nothing on Alertmanager.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Protocol

import httpx

from outcomewatch.clock import Clock
from outcomewatch.config import NotifyConfig
from outcomewatch.incidents.senders import DeliveryError, send_alertmanager, send_webhook
from outcomewatch.model import OutboxRow

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500
DEFAULT_CONCURRENCY = 8  # (incident, target) sequences delivered at once


class OutboxStore(Protocol):
    def due_notifications(self, now: datetime, limit: int) -> list[OutboxRow]:
        """Rows pending or failed with next_attempt_at <= now, by id (a blocking DB read)."""
        ...

    def pending_before(self, incident_id: int, row_id: int) -> bool:
        """True if a row of the same incident and target with a smaller id is not sent."""
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
        """``on_attempt(target, delivered)`` is called after every delivery attempt (metrics)."""
        self._on_attempt = on_attempt or (lambda target, delivered: None)
        self._resent: dict[int, datetime] = {}  # incident id -> when its alert was last posted
        self._store = store
        self._config = config
        self._clock = clock
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._batch_size = batch_size
        self._slots = asyncio.Semaphore(concurrency)

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

    async def run_once(self) -> int:
        """Attempt every due row once (up to ``batch_size`` rows), in order within each incident
        and target; the number delivered. Store errors propagate, after every delivery already
        under way has been recorded."""
        return (await self._run_batch())[1]

    async def run_forever(self, *, interval: timedelta = timedelta(seconds=1)) -> None:
        """run_once every ``interval`` until cancelled; an error is logged, never raised.

        A full batch that delivered something is followed at once by the next batch, so a
        backlog drains at the receivers' pace rather than one batch per interval.
        """
        while True:
            try:
                fetched, sent = await self._run_batch()
                await self.resend_firing()
            except Exception:
                log.exception("notification delivery failed; retrying in %s", interval)
                fetched, sent = 0, 0
            if fetched < self._batch_size or sent == 0:
                await asyncio.sleep(interval.total_seconds())

    async def resend_firing(self) -> int:
        """Post the firing alert of every open or acknowledged incident again to the
        Alertmanager targets that ask for it (``resend_every``), each at most that often.
        Outside the outbox on purpose: a resend is a refresh, idempotent for Alertmanager
        (same labels), not a transition. Returns how many alerts were posted."""
        if not any(route.alertmanager and route.alertmanager.resend_every
                   for route in self._config.routes.values()):
            return 0
        now = self._clock()
        posted = 0
        firing = await asyncio.to_thread(self._store.firing_incidents)
        for payload in firing:
            route = self._config.routes.get(str(payload.get("route")))
            target = route.alertmanager if route else None
            if target is None or target.resend_every is None:
                continue
            last = self._resent.get(int(payload["id"]))
            if last is None:
                # The transition itself was posted just now (or at start, by the outbox):
                # count from here.
                self._resent[int(payload["id"])] = now
                continue
            if now - last < target.resend_every:
                continue
            try:
                await send_alertmanager(self._client, target, payload, transition="firing",
                                        external_url=self._config.external_url, now=now)
                posted += 1
                self._resent[int(payload["id"])] = now
            except (DeliveryError, httpx.HTTPError) as exc:
                log.warning("resending the alert of incident %s failed: %s", payload["id"], exc)
        still_firing = {int(p["id"]) for p in firing}
        for incident_id in list(self._resent):
            if incident_id not in still_firing:
                del self._resent[incident_id]
        return posted

    async def _run_batch(self) -> tuple[int, int]:
        rows = await asyncio.to_thread(
            self._store.due_notifications, self._clock(), self._batch_size
        )
        sequences: dict[tuple[int, str], list[OutboxRow]] = {}
        for row in sorted(rows, key=lambda r: r.id):
            sequences.setdefault((row.incident_id, row.target), []).append(row)
        results = await asyncio.gather(
            *(self._deliver_sequence(sequence) for sequence in sequences.values()),
            return_exceptions=True,
        )
        # gather waits for every sequence, so one store error does not cancel a request in
        # flight (whose outcome would then go unrecorded and the row be sent twice).
        errors = [result for result in results if isinstance(result, BaseException)]
        for error in errors[1:]:
            log.error("notification delivery failed", exc_info=error)
        if errors:
            raise errors[0]
        return len(rows), sum(result for result in results if isinstance(result, int))

    async def _deliver_sequence(self, rows: list[OutboxRow]) -> int:
        """Deliver ``rows`` (one incident and target, by id) until one fails; how many sent."""
        sent = 0
        async with self._slots:
            for row in rows:
                if await asyncio.to_thread(self._store.pending_before, row.incident_id, row.id):
                    break  # an earlier row is unsent: this one and the later ones wait for it
                error = await self._attempt(row)
                self._on_attempt(row.target, error is None)
                at = self._clock()
                if error is None:
                    await self._store.mark_notification(
                        row.id, sent=True, at=at, error=None, next_attempt_at=None
                    )
                    sent += 1
                    continue
                delay = backoff_delay(row.attempts + 1, self._backoff_base, self._backoff_max)
                log.warning(
                    "notification %d (incident %d, %s, %s via route %r) failed, attempt %d, "
                    "next in %s: %s",
                    row.id, row.incident_id, row.transition, row.target, row.route,
                    row.attempts + 1, delay, error,
                )
                await self._store.mark_notification(
                    row.id, sent=False, at=at, error=error, next_attempt_at=at + delay
                )
                break
        return sent

    async def _attempt(self, row: OutboxRow) -> str | None:
        """Send ``row`` once; None if delivered, else why not."""
        route = self._config.routes.get(row.route)
        if route is None:
            return f"route {row.route!r} is not configured"
        external_url = self._config.external_url
        try:
            if row.target == "alertmanager":
                if route.alertmanager is None:
                    return f"route {row.route!r} has no alertmanager target"
                await send_alertmanager(
                    self._client, route.alertmanager, row.payload,
                    transition=row.transition, external_url=external_url, now=self._clock(),
                )
            elif row.target == "webhook":
                if route.webhook is None:
                    return f"route {row.route!r} has no webhook target"
                await send_webhook(
                    self._client, route.webhook, row.payload,
                    transition=row.transition, route=row.route, external_url=external_url,
                )
            else:
                return f"unknown target {row.target!r}"
        except DeliveryError as exc:
            return str(exc)
        except Exception as exc:
            # A bug or a malformed snapshot must not stop the worker; the row keeps the reason.
            log.exception("notification %d could not be built", row.id)
            return f"internal error: {type(exc).__name__}: {exc}"
        return None


__all__ = ["Notifier", "OutboxRow", "OutboxStore", "backoff_delay"]
