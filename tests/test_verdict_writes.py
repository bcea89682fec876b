"""verdicts.write through the real Store on a DuckDB file: the paths a batch takes depending on
what is stored already (runs new or re-sent, streaks and incidents new or stored)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from outcomewatch.incidents.lifecycle import Policy
from outcomewatch.model import FailureReason, RunFailed, RunOpened
from outcomewatch.store.duckdb import Store
from outcomewatch.store.verdicts import Judged, VerdictBatch

RULE = "billing"
AT = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(str(tmp_path / "verdicts.duckdb"))
    yield s
    s.close()


def opened(run_id: str, customer: str) -> RunOpened:
    return RunOpened(run_id, RULE, "ab" * 16, "cd" * 8, AT, None, (("customer.id", customer),))


def failed(run_id: str, at: datetime) -> Judged:
    return Judged(RunFailed(run_id, RULE, "ab" * 16, None, AT, at, FailureReason.TRACE_IDLE,
                            ("email.delivered",), 0), summary="no email")


def write(store: Store, *events: RunOpened | Judged, policy: Policy | None = None) -> None:
    batch = VerdictBatch(events=list(events), policies={RULE: policy or Policy()})
    asyncio.run(store.write_verdicts_and_wait(batch))


def rows(store: Store, sql: str) -> list[tuple[object, ...]]:
    result = asyncio.run(store.run(lambda db: db.execute(sql).fetchall()))
    assert isinstance(result, list)
    return result


def test_a_re_sent_trigger_beside_a_new_one_adds_search_keys_only_for_the_new_run(
        store: Store) -> None:
    write(store, opened("run-a", "cus_1"))
    write(store, opened("run-a", "cus_1"), opened("run-b", "cus_2"))
    assert sorted(rows(store, "SELECT run_id, value FROM run_keys")) == [
        ("run-a", "cus_1"), ("run-b", "cus_2")]


def test_streaks_and_incidents_are_inserted_once_then_updated_in_place(store: Store) -> None:
    policy = Policy(open_after=2)
    write(store, opened("run-1", "c"), failed("run-1", AT), policy=policy)  # streak 1: held
    assert rows(store, "SELECT consecutive_failures, held FROM rule_state") == [(1, ["run-1"])]
    assert rows(store, "SELECT count(*) FROM incidents") == [(0,)]
    write(store, opened("run-2", "c"), failed("run-2", AT + timedelta(seconds=1)),
          policy=policy)  # streak 2: opens, both failures attached
    write(store, opened("run-3", "c"), failed("run-3", AT + timedelta(seconds=2)),
          policy=policy)  # counted in the open incident
    assert rows(store, "SELECT rule, consecutive_failures, held FROM rule_state") == [
        (RULE, 3, [])]
    assert rows(store, "SELECT status, failure_count FROM incidents") == [("open", 3)]
    assert sorted(rows(store, "SELECT run_id, incident_id FROM incident_failures")) == [
        ("run-1", 1), ("run-2", 1), ("run-3", 1)]
