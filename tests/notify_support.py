"""Shared pieces of the outbox worker's tests: real HTTP receivers (Starlette under uvicorn on
free ports), an in-memory OutboxStore with the contract's semantics, snapshots and configs.
Time is a ManualClock the tests move; nothing here sleeps."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Collection, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from outcomewatch.config import NotifyConfig, load_config
from outcomewatch.incidents import OutboxRow
from tests.servers import running_asgi

T = TypeVar("T")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
OPENED_AT = "2025-03-01T11:58:00+00:00"
RESOLVED_AT = "2025-03-01T12:30:00+00:00"
EXTERNAL = "http://outcomewatch.internal:8080"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Stands in for Alertmanager and webhook receivers: records every request, and answers
    500 "boom" to those ``fail`` picks (by default none)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.fail: Callable[[Received], bool] = lambda _: False
        self.release = threading.Event()  # a request to /slow waits for it
        self.arrived = threading.Event()  # set by every request, for tests that wait for one
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["POST"])])

    async def _handle(self, request: Request) -> Response:
        received = Received(request.url.path, dict(request.headers), await request.body(), 200)
        if received.path == "/slow":
            await asyncio.to_thread(self.release.wait, 10)
        if self.fail(received):
            received.status = 500
        self.requests.append(received)
        self.arrived.set()
        return Response("boom" if received.status == 500 else "", status_code=received.status)

    def delivered(self) -> list[Any]:
        return [r.json() for r in self.requests if r.status == 200]


def receiving() -> Iterator[tuple[Receiver, str]]:
    """The body of each test module's ``receiver`` fixture: a Receiver served on a free port."""
    recv = Receiver()
    with running_asgi(recv.app) as base_url:
        yield recv, base_url
        recv.release.set()


@dataclass
class Entry:
    row: OutboxRow
    status: str = "pending"
    next_attempt_at: datetime = T0
    last_error: str | None = None
    sent_at: datetime | None = None


@dataclass
class MemoryOutbox:
    """The OutboxStore contract, in memory."""

    entries: dict[int, Entry] = field(default_factory=dict)
    marks: list[tuple[int, bool, datetime, str | None, datetime | None]] = field(
        default_factory=list
    )
    firing: list[dict[str, Any]] = field(default_factory=list)

    def firing_incidents(self) -> list[dict[str, Any]]:
        return list(self.firing)

    def add(self, incident: int, transition: str, target: str, route: str = "billing") -> int:
        row_id = len(self.entries) + 1
        payload = snapshot(incident, transition, route)
        row = OutboxRow(row_id, incident, transition, target, route, payload, 0, T0)
        self.entries[row_id] = Entry(row)
        return row_id

    def due_notifications(
        self, now: datetime, limit: int, *, route: str | None = None, target: str | None = None,
        exclude: Collection[tuple[str, str]] = (),
    ) -> list[OutboxRow]:
        due = [
            e.row
            for e in self.entries.values()
            if e.status in ("pending", "failed") and e.next_attempt_at <= now
            and route in (None, e.row.route) and target in (None, e.row.target)
            and (e.row.route, e.row.target) not in exclude and not self._behind(e.row)
        ]
        return sorted(due, key=lambda r: r.id)[:limit]

    def _behind(self, row: OutboxRow) -> bool:
        """An earlier row of the same incident and target is unsent (the row must wait)."""
        return any(
            e.row.incident_id == row.incident_id and e.row.target == row.target
            and e.status != "sent"
            for i, e in self.entries.items()
            if i < row.id
        )

    async def mark_notification(
        self,
        row_id: int,
        *,
        sent: bool,
        at: datetime,
        error: str | None,
        next_attempt_at: datetime | None,
    ) -> None:
        self.marks.append((row_id, sent, at, error, next_attempt_at))
        entry = self.entries[row_id]
        if sent:
            entry.status, entry.sent_at = "sent", at
        else:
            assert next_attempt_at is not None
            entry.status, entry.last_error = "failed", error
            entry.next_attempt_at = next_attempt_at
            entry.row = OutboxRow(**{**entry.row.__dict__, "attempts": entry.row.attempts + 1})


def snapshot(incident: int, transition: str, route: str) -> dict[str, Any]:
    resolved = transition == "resolved"
    acknowledged = transition == "acknowledged"
    return {
        "id": incident,
        "rule": "payment-failed-updates-access",
        "status": "resolved" if resolved else "acknowledged" if acknowledged else "open",
        "severity": "critical",
        "owner": "billing",
        "route": route,
        "summary": 'access not updated after "invoice.payment_failed" <x>',
        "description": "A failed invoice must change access.",
        "group": {"customer.id": "c-42"},
        "opened_at": OPENED_AT,
        "last_failure_at": OPENED_AT,
        "resolved_at": RESOLVED_AT if resolved else None,
        "failure_count": 2,
        "transition": transition,
        "comment": "on it" if acknowledged else None,
        "actor": "ana" if acknowledged else None,
    }


def config(tmp_path: Path, base_url: str, routes: str) -> NotifyConfig:
    text = f"external_url: {EXTERNAL}\nroutes:\n" + routes.replace("BASE", base_url)
    path = tmp_path / "outcomewatch.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


BOTH = """\
  billing:
    alertmanager: {url: BASE/am}
    webhook: {url: BASE/hook, headers: {Authorization: Bearer xyz}}
"""
WEBHOOK = "  billing:\n    webhook: {url: BASE/hook}\n"


def run(scenario: Callable[[httpx.AsyncClient], Coroutine[Any, Any, T]]) -> T:
    async def main() -> T:
        async with httpx.AsyncClient() as client:
            return await scenario(client)

    return asyncio.run(main())
