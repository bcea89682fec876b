"""The outbox worker against real HTTP receivers (Starlette under uvicorn on free ports).

Time is a ManualClock moved between ``run_once`` calls: retries are due when the clock says so,
and nothing here sleeps. The OutboxStore is an in-memory stand-in with the contract's semantics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Collection, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from outcomewatch.clock import ManualClock
from outcomewatch.config import DEFAULT_RESEND, NotifyConfig, load_config
from outcomewatch.incidents import Notifier, OutboxRow, backoff_delay
from outcomewatch.incidents.senders import (
    NOT_ENDED,
    alert_labels,
    sanitize_label_name,
)
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


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
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


def test_a_lifecycle_arrives_once_each_in_order(tmp_path: Path, receiver: Any) -> None:
    recv, base = receiver
    store, clock = MemoryOutbox(), ManualClock(T0)
    for transition in ("opened", "acknowledged", "resolved"):
        store.add(1, transition, "alertmanager")
        store.add(1, transition, "webhook")
    notifier_config = config(tmp_path, base, BOTH)

    async def scenario(client: httpx.AsyncClient) -> tuple[int, int]:
        notifier = Notifier(store, notifier_config, clock=clock, client=client)
        return await notifier.run_once(), await notifier.run_once()

    assert run(scenario) == (6, 0)  # the second pass finds nothing left
    assert all(e.status == "sent" for e in store.entries.values())

    # Alertmanager: opened fires, acknowledged is not sent (no such notion), resolved ends it.
    alerts = [r for r in recv.requests if r.path == "/am/api/v2/alerts"]
    assert len(alerts) == 2
    (fired,), (ended,) = (r.json() for r in alerts)
    url = f"{EXTERNAL}/api/v1/incidents/1"
    labels = {
        "alertname": "OutcomeMissing",
        "rule": "payment-failed-updates-access",
        "owner": "billing",
        "severity": "critical",
        "route": "billing",
        "customer_id": "c-42",
    }
    annotations = {
        "summary": 'access not updated after "invoice.payment_failed" <x>',
        "description": "A failed invoice must change access.",
        "incident_url": url,
    }
    assert fired["labels"] == ended["labels"] == labels
    assert fired["annotations"] == ended["annotations"] == annotations
    assert fired["startsAt"] == ended["startsAt"] == OPENED_AT
    assert fired["generatorURL"] == url
    # Firing for 4 x resend_every (1m by default): it is posted again meanwhile, and ends on
    # its own if outcomewatch stops.
    assert datetime.fromisoformat(fired["endsAt"]) == T0 + 4 * DEFAULT_RESEND
    assert ended["endsAt"] == RESOLVED_AT

    hooks = [r for r in recv.requests if r.path == "/hook"]
    assert [h.headers["authorization"] for h in hooks] == ["Bearer xyz"] * 3
    assert [h.headers["content-type"] for h in hooks] == ["application/json"] * 3
    bodies = [h.json() for h in hooks]
    assert [b["outcomewatch"]["transition"] for b in bodies] == [
        "opened", "acknowledged", "resolved",
    ]
    assert [b["status"] for b in bodies] == ["firing", "firing", "resolved"]
    assert bodies[1]["outcomewatch"]["comment"] == "on it"
    assert bodies[1]["outcomewatch"]["actor"] == "ana"
    first = bodies[0]
    assert first["version"] == "4"
    assert first["groupKey"] == "outcomewatch:1"
    assert first["receiver"] == "billing"
    assert first["externalURL"] == EXTERNAL
    assert first["groupLabels"] == {"rule": "payment-failed-updates-access", "customer_id": "c-42"}
    assert first["commonLabels"] == labels
    assert first["commonAnnotations"] == annotations
    (alert,) = first["alerts"]
    assert alert["status"] == "firing"
    assert alert["labels"] == labels and alert["annotations"] == annotations
    assert (alert["startsAt"], alert["endsAt"]) == (OPENED_AT, NOT_ENDED)
    assert alert["generatorURL"] == url
    assert len(alert["fingerprint"]) == 16
    assert bodies[2]["alerts"][0]["endsAt"] == RESOLVED_AT
    assert bodies[2]["alerts"][0]["fingerprint"] == alert["fingerprint"]


def test_a_failing_receiver_gets_everything_once_with_growing_backoff(
    tmp_path: Path, receiver: Any
) -> None:
    recv, base = receiver
    store, clock = MemoryOutbox(), ManualClock(T0)
    opened = store.add(1, "opened", "webhook")
    resolved = store.add(1, "resolved", "webhook")
    other = store.add(2, "opened", "webhook")
    failures = {"left": 3}

    def fail(request: Received) -> bool:
        # Only incident 1 fails: incident 2 shows that one incident does not hold up another.
        if request.json()["groupKey"] == "outcomewatch:1" and failures["left"] > 0:
            failures["left"] -= 1
            return True
        return False

    recv.fail = fail
    notifier_config = config(tmp_path, base, WEBHOOK)

    async def scenario(client: httpx.AsyncClient) -> list[int]:
        notifier = Notifier(store, notifier_config, clock=clock, client=client)
        sent = [await notifier.run_once()]  # T0: 1 fails, 2 delivered
        assert store.entries[opened].last_error == "HTTP 500: boom"
        clock.advance(timedelta(milliseconds=999))
        sent.append(await notifier.run_once())  # not due yet
        for wait in (timedelta(milliseconds=1), timedelta(seconds=2), timedelta(seconds=4)):
            # The resolved row is due all along, yet never tried before its opened row.
            assert store.entries[resolved].row.attempts == 0
            clock.advance(wait)
            sent.append(await notifier.run_once())
        sent.append(await notifier.run_once())
        return sent

    assert run(scenario) == [1, 0, 0, 0, 2, 0]
    failed = [m for m in store.marks if not m[1]]
    delays = [next_at - at for (_, _, at, _, next_at) in failed if next_at is not None]
    assert delays == [timedelta(seconds=1), timedelta(seconds=2), timedelta(seconds=4)]
    assert [r.status for r in recv.requests].count(500) == 3
    delivered = [(b["groupKey"], b["outcomewatch"]["transition"]) for b in recv.delivered()]
    assert delivered == [
        ("outcomewatch:2", "opened"),
        ("outcomewatch:1", "opened"),
        ("outcomewatch:1", "resolved"),
    ]
    assert {store.entries[i].status for i in (opened, resolved, other)} == {"sent"}


def test_backoff_is_capped_and_a_transport_error_is_a_failure(tmp_path: Path) -> None:
    assert backoff_delay(10_000, timedelta(seconds=1), timedelta(minutes=5)) == timedelta(
        minutes=5
    )
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    store, clock = MemoryOutbox(), ManualClock(T0)
    row = store.add(1, "opened", "alertmanager")
    notifier_config = config(tmp_path, closed, "  billing:\n    alertmanager: {url: BASE}\n")

    async def scenario(client: httpx.AsyncClient) -> None:
        notifier = Notifier(
            store, notifier_config, clock=clock, client=client,
            backoff_max=timedelta(seconds=5),
        )
        for _ in range(5):
            assert await notifier.run_once() == 0
            clock.advance(timedelta(seconds=5))

    run(scenario)
    delays = [next_at - at for (_, _, at, _, next_at) in store.marks if next_at is not None]
    assert delays == [timedelta(seconds=s) for s in (1, 2, 4, 5, 5)]
    assert (store.entries[row].last_error or "").startswith("ConnectError: ")


def test_a_slow_receiver_times_out(tmp_path: Path, receiver: Any) -> None:
    recv, base = receiver
    store, clock = MemoryOutbox(), ManualClock(T0)
    row = store.add(1, "opened", "webhook")
    notifier_config = config(
        tmp_path, base, "  billing:\n    webhook: {url: BASE/slow, timeout: 100ms}\n"
    )

    async def scenario(client: httpx.AsyncClient) -> int:
        return await Notifier(store, notifier_config, clock=clock, client=client).run_once()

    assert run(scenario) == 0
    recv.release.set()
    assert (store.entries[row].last_error or "").startswith("ReadTimeout")


def test_a_template_renders_the_body(tmp_path: Path, receiver: Any) -> None:
    recv, base = receiver
    store, clock = MemoryOutbox(), ManualClock(T0)
    store.add(7, "opened", "webhook")
    routes = """\
  billing:
    webhook:
      url: BASE/hook
      content_type: application/json; charset=utf-8
      template: |
        {"text": {{ (incident.summary ~ " " ~ url) | tojson }},
         "transition": "{{ transition }}", "failures": {{ incident.failure_count }},
         "customer": {{ incident.group["customer.id"] | tojson }}}
"""
    notifier_config = config(tmp_path, base, routes)

    async def scenario(client: httpx.AsyncClient) -> int:
        return await Notifier(store, notifier_config, clock=clock, client=client).run_once()

    assert run(scenario) == 1
    (request,) = recv.requests
    assert request.headers["content-type"] == "application/json; charset=utf-8"
    summary = 'access not updated after "invoice.payment_failed" <x>'
    assert request.json() == {
        "text": f"{summary} {EXTERNAL}/api/v1/incidents/7",
        "transition": "opened",
        "failures": 2,
        "customer": "c-42",
    }


def test_a_template_that_fails_to_render_fails_the_row(tmp_path: Path, receiver: Any) -> None:
    recv, base = receiver
    store, clock = MemoryOutbox(), ManualClock(T0)
    row = store.add(1, "opened", "webhook")
    routes = "  billing:\n    webhook: {url: BASE/hook, template: '{{ 1 / 0 }}'}\n"
    notifier_config = config(tmp_path, base, routes)

    async def scenario(client: httpx.AsyncClient) -> int:
        return await Notifier(store, notifier_config, clock=clock, client=client).run_once()

    assert run(scenario) == 0
    assert recv.requests == []
    assert store.entries[row].last_error == "template error: ZeroDivisionError: division by zero"


def test_an_unconfigured_route_or_target_fails_and_is_retried(
    tmp_path: Path, receiver: Any
) -> None:
    recv, base = receiver
    store, clock = MemoryOutbox(), ManualClock(T0)
    no_route = store.add(1, "opened", "webhook", route="nope")
    no_target = store.add(2, "opened", "alertmanager")
    later = store.add(2, "resolved", "alertmanager")
    without_am = config(tmp_path, base, WEBHOOK)

    async def first(client: httpx.AsyncClient) -> int:
        return await Notifier(store, without_am, clock=clock, client=client).run_once()

    assert run(first) == 0
    assert store.entries[no_route].last_error == "route 'nope' is not configured"
    assert store.entries[no_target].last_error == "route 'billing' has no alertmanager target"
    assert store.entries[later].status == "pending"  # waits behind its failed opened row
    assert recv.requests == []

    # The config comes back (a restart with the route restored): both are delivered.
    restored = config(tmp_path, base, BOTH + "  nope:\n    webhook: {url: BASE/hook}\n")
    clock.advance(timedelta(seconds=1))

    async def second(client: httpx.AsyncClient) -> int:
        return await Notifier(store, restored, clock=clock, client=client).run_once()

    assert run(second) == 3
    assert len(recv.requests) == 3


def test_run_forever_survives_an_exception(
    tmp_path: Path, receiver: Any, caplog: pytest.LogCaptureFixture
) -> None:
    recv, base = receiver
    store, clock = MemoryOutbox(), ManualClock(T0)
    store.add(1, "opened", "webhook")
    calls = {"n": 0}
    real = store.due_notifications

    def flaky(now: datetime, limit: int, **which: Any) -> list[OutboxRow]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("database is locked")
        return real(now, limit, **which)

    store.due_notifications = flaky  # type: ignore[method-assign]
    notifier_config = config(tmp_path, base, WEBHOOK)

    async def scenario(client: httpx.AsyncClient) -> None:
        notifier = Notifier(store, notifier_config, clock=clock, client=client)
        task = asyncio.create_task(notifier.run_forever(interval=timedelta(milliseconds=1)))
        for _ in range(5_000):  # until the failed round has backed off (on the injected clock)
            if "database is locked" in caplog.text:
                break
            await asyncio.sleep(0.002)
        assert "next attempt in 0:00:01: RuntimeError: database is locked" in caplog.text
        assert "Traceback" not in caplog.text
        clock.advance(timedelta(seconds=1))
        assert await asyncio.to_thread(recv.arrived.wait, 10)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario)
    assert calls["n"] >= 2 and len(recv.delivered()) == 1


def test_label_names_are_sanitised_and_never_replace_the_identity_labels() -> None:
    assert sanitize_label_name("customer.id") == "customer_id"
    assert sanitize_label_name("9lives") == "_9lives"
    assert sanitize_label_name("") == "_"
    payload = {
        "id": 1, "rule": "r", "owner": "o", "severity": "warning", "route": "x",
        "group": {"customer.id": "c1", "customer_id": "c2", "9lives": 3, "rule": "other",
                  "flag": True, "gone": None, "blank": ""},
    }
    assert alert_labels(payload) == {
        "alertname": "OutcomeMissing", "rule": "r", "owner": "o", "severity": "warning",
        "route": "x", "customer_id": "c1", "customer_id_": "c2", "_9lives": "3",
        "group_rule": "other", "flag": "true", "gone": "<missing>", "blank": "<empty>",
    }


def test_a_missing_and_an_empty_group_value_are_two_alert_identities() -> None:
    def labels(value: Any) -> dict[str, str]:
        return alert_labels({"id": 1, "rule": "r", "group": {"customer.id": value}})

    identities = {tuple(sorted(labels(v).items())) for v in (None, "", "c-1")}
    assert len(identities) == 3


AM_ONLY = "  billing:\n    alertmanager: {url: BASE/am}\n"


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "outcomewatch.incidents.notify" and r.levelno == logging.WARNING]


def test_a_target_that_is_down_backs_off_as_a_whole_with_one_line_per_step(
    tmp_path: Path, receiver: Any, caplog: pytest.LogCaptureFixture
) -> None:
    recv, base = receiver
    recv.fail = lambda request: request.path == "/hook"
    store, clock = MemoryOutbox(), ManualClock(T0)
    for incident in range(1, 21):
        store.add(incident, "opened", "webhook")
    store.add(21, "opened", "webhook", route="payments")  # another route: not held up
    routes = WEBHOOK + "  payments:\n    webhook: {url: BASE/other}\n"
    notifier_config = config(tmp_path, base, routes)
    attempts: list[tuple[str, bool]] = []

    async def scenario(client: httpx.AsyncClient) -> list[int]:
        notifier = Notifier(store, notifier_config, clock=clock, client=client, concurrency=4,
                            on_attempt=lambda target, ok: attempts.append((target, ok)))
        sent = [await notifier.run_once()]
        sent.append(await notifier.run_once())  # backing off: nothing is tried
        clock.advance(timedelta(seconds=1))
        sent.append(await notifier.run_once())
        return sent

    assert run(scenario) == [1, 0, 0]
    hook_requests = [r for r in recv.requests if r.path == "/hook"]
    assert len(hook_requests) == 8  # the 4 in flight when it went down, twice
    assert [r.path for r in recv.requests].count("/other") == 1
    assert attempts.count(("webhook", False)) == 8
    lines = warnings(caplog)
    assert len(lines) == 2
    # Which of the four in flight answered first varies; the line names one of them.
    assert re.fullmatch(r"webhook of route 'billing' failed \(1 in a row; 16 more waiting\), "
                        r"next attempt in 0:00:01: notification [1-4] \(incident [1-4], "
                        r"opened\): HTTP 500: boom", lines[0])
    assert "(2 in a row; 16 more waiting), next attempt in 0:00:02" in lines[1]
    untried = [e for e in store.entries.values() if e.row.incident_id > 4]
    assert all(e.row.attempts == 0 for e in untried if e.row.route == "billing")


def test_firing_alerts_are_re_sent_in_one_request_per_target_counted_and_backed_off(
    tmp_path: Path, receiver: Any, caplog: pytest.LogCaptureFixture
) -> None:
    recv, base = receiver
    store, clock = MemoryOutbox(), ManualClock(T0)
    store.firing = [snapshot(1, "opened", "billing"), snapshot(2, "opened", "billing"),
                    snapshot(3, "opened", "elsewhere")]
    store.firing[1]["episode_started_at"] = "2025-03-01T11:59:30.000Z"  # re-opened
    notifier_config = config(tmp_path, base, AM_ONLY)
    attempts: list[tuple[str, bool]] = []

    async def scenario(client: httpx.AsyncClient) -> None:
        notifier = Notifier(store, notifier_config, clock=clock, client=client,
                            on_attempt=lambda target, ok: attempts.append((target, ok)))
        await notifier.run_once()  # the transitions were just posted: count from here
        clock.advance(timedelta(seconds=59))
        await notifier.run_once()
        assert recv.requests == []
        clock.advance(timedelta(seconds=1))
        await notifier.run_once()
        recv.fail = lambda request: True
        clock.advance(timedelta(minutes=1))
        await notifier.run_once()  # fails: backs off 1 s
        await notifier.run_once()  # not yet
        clock.advance(timedelta(seconds=1))
        await notifier.run_once()  # fails again: 2 s

    run(scenario)
    assert [r.path for r in recv.requests] == ["/am/api/v2/alerts"] * 3
    alerts = recv.requests[0].json()
    assert [a["labels"]["route"] for a in alerts] == ["billing", "billing"]
    assert [a["startsAt"] for a in alerts] == [OPENED_AT, "2025-03-01T11:59:30.000Z"]
    assert {a["endsAt"] for a in alerts} == {(T0 + timedelta(minutes=1) + 4 * DEFAULT_RESEND)
                                             .isoformat()}
    assert attempts == [("alertmanager", True), ("alertmanager", False),
                        ("alertmanager", False)]
    lines = warnings(caplog)
    assert len(lines) == 2 and all("re-sending 2 firing alerts: HTTP 500: boom" in line
                                   for line in lines)


def test_a_refused_notification_fails_alone_and_the_target_goes_on(
    tmp_path: Path, receiver: Any
) -> None:
    recv, base = receiver
    store, clock = MemoryOutbox(), ManualClock(T0)
    refused = store.add(1, "opened", "webhook")
    store.add(2, "opened", "webhook")
    template = "{{ 1 // (incident.id - 1) }}"  # fails for incident 1 only
    routes = f"  billing:\n    webhook: {{url: BASE/hook, template: '{template}'}}\n"
    notifier_config = config(tmp_path, base, routes)

    async def scenario(client: httpx.AsyncClient) -> tuple[int, int]:
        notifier = Notifier(store, notifier_config, clock=clock, client=client)
        first = await notifier.run_once()
        store.add(3, "opened", "webhook")
        return first, await notifier.run_once()  # no backoff of the target as a whole

    assert run(scenario) == (1, 1)
    assert (store.entries[refused].last_error or "").startswith("template error")
    assert len(recv.requests) == 2


def test_wake_starts_a_round_without_waiting_for_the_interval(
    tmp_path: Path, receiver: Any
) -> None:
    recv, base = receiver
    store, clock = MemoryOutbox(), ManualClock(T0)
    notifier_config = config(tmp_path, base, WEBHOOK)

    reads = {"n": 0}
    real = store.due_notifications

    def counted(now: datetime, limit: int, **which: Any) -> list[OutboxRow]:
        rows = real(now, limit, **which)
        reads["n"] += 1  # after the read: a row added from now on is not in it
        return rows

    store.due_notifications = counted  # type: ignore[method-assign]

    async def scenario(client: httpx.AsyncClient) -> None:
        notifier = Notifier(store, notifier_config, clock=clock, client=client)
        task = asyncio.create_task(notifier.run_forever(interval=timedelta(hours=1)))
        for _ in range(5_000):  # until its first round (webhook, unrouted rows) has read
            if reads["n"] >= 2:
                break
            await asyncio.sleep(0.002)
        # That round found nothing, so it reads no more: only wake() starts another.
        store.add(1, "opened", "webhook")
        notifier.wake()
        assert await asyncio.to_thread(recv.arrived.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario)
    assert len(recv.delivered()) == 1
