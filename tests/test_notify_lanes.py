"""The outbox worker's targets are independent lanes: a target that is down backs off as a
whole with one log line per step; re-sends go in one request per target, counted and backed
off; a refused notification fails alone; ``wake()`` starts a round at once."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from outcomewatch.clock import ManualClock
from outcomewatch.config import DEFAULT_RESEND
from outcomewatch.incidents import Notifier, OutboxRow
from tests.notify_support import (
    OPENED_AT,
    T0,
    WEBHOOK,
    MemoryOutbox,
    Receiver,
    config,
    receiving,
    run,
    snapshot,
)

AM_ONLY = "  billing:\n    alertmanager: {url: BASE/am}\n"


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "outcomewatch.incidents.notify" and r.levelno == logging.WARNING]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    yield from receiving()


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
