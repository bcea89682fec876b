"""The outbox worker against real HTTP receivers: what arrives, in order, once; backoff;
timeouts; templates; unconfigured routes; the labels. Time is a ManualClock moved between
``run_once`` calls: retries are due when the clock says so, and nothing here sleeps."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from outcomewatch.clock import ManualClock
from outcomewatch.config import DEFAULT_RESEND
from outcomewatch.incidents import Notifier, OutboxRow, backoff_delay
from outcomewatch.incidents.senders import (
    NOT_ENDED,
    alert_labels,
    sanitize_label_name,
)
from tests.notify_support import (
    BOTH,
    EXTERNAL,
    OPENED_AT,
    RESOLVED_AT,
    T0,
    WEBHOOK,
    MemoryOutbox,
    Received,
    Receiver,
    config,
    receiving,
    run,
)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    yield from receiving()


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
