"""The server's store and the offline path (``outcomewatch test`` / ``replay``) apply one
incident lifecycle: the same generated verdict sequences, fed to a real Store on a DuckDB file
(in batches of random sizes, so the state goes through the database between batches) and to the
in-memory IncidentBook, must give identical incidents: counts, attached runs, statuses,
transitions and their times."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from outcomewatch.incidents.lifecycle import Policy, group_key, group_of
from outcomewatch.model import FailureReason, RunFailed, RunOpened, RunPassed
from outcomewatch.offline.drive import IncidentBook
from outcomewatch.store.duckdb import Store
from outcomewatch.store.verdicts import Judged, VerdictBatch

T0 = datetime(2026, 1, 1, tzinfo=UTC)
_example = itertools.count()


@dataclass(frozen=True)
class Step:
    group: int  # which group value set
    failed: bool
    minutes: int  # after the previous verdict
    cut: bool  # the batch ends after this verdict


policies = st.builds(
    Policy,
    open_after=st.integers(1, 3),
    resolve_after=st.none() | st.integers(1, 3),
    reopen_window=st.sampled_from([timedelta(minutes=5), timedelta(hours=1)]),
)
steps = st.lists(
    st.builds(Step, group=st.integers(0, 2), failed=st.booleans(), minutes=st.integers(0, 20),
              cut=st.booleans()),
    min_size=1, max_size=20,
)
# A group value set with what the two group_key implementations used to disagree on.
GROUPS: list[tuple[tuple[str, Any], ...]] = [(), (("customer.id", "Zoë-ß"),),
                                             (("amount", float("nan")),)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    # A real file, in memory-backed /dev/shm where there is one: thousands of small commits,
    # each an fsync on a disk, would make this test wait on the disk, not on the code.
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path_factory.mktemp("lc")
    store = Store(str(folder / "ow.duckdb"))
    yield store
    store.close()
    shutil.rmtree(folder, ignore_errors=True)


def verdicts_of(rule: str, plan: list[Step]) -> list[tuple[RunPassed | RunFailed, bool]]:
    at = T0
    out: list[tuple[RunPassed | RunFailed, bool]] = []
    for i, step in enumerate(plan):
        at += timedelta(minutes=step.minutes, seconds=1)
        group = GROUPS[step.group]
        run_id, trace = f"{rule}-run-{i}", f"{i:032x}"
        verdict: RunPassed | RunFailed = (
            RunFailed(run_id, rule, trace, None, at - timedelta(seconds=1), at,
                      FailureReason.TRACE_IDLE, ("email.sent",), 0, group=group)
            if step.failed else
            RunPassed(run_id, rule, trace, at - timedelta(seconds=1), at, group=group))
        out.append((verdict, step.cut))
    return out


def online(store: Store, rule: str, policy: Policy,
           verdicts: list[tuple[RunPassed | RunFailed, bool]]) -> dict[str, Any]:
    async def feed() -> None:
        batch = VerdictBatch(policies={rule: policy})
        for verdict, cut in verdicts:
            batch.events.append(RunOpened(verdict.run_id, rule, verdict.trace_id, "",
                                          verdict.opened_at, None))
            batch.events.append(Judged(verdict, summary=f"{rule} failed"))
            if cut:
                await store.write_verdicts_and_wait(batch)
                batch = VerdictBatch(policies={rule: policy})
        await store.write_verdicts_and_wait(batch)

    asyncio.run(feed())
    db = store.conn.cursor()
    try:
        incidents = db.execute(
            "SELECT id, group_key, status, failure_count, opened_at, last_failure_at, "
            "resolved_at FROM incidents WHERE rule = ? ORDER BY id", [rule]).fetchall()
        ids = {row[0]: n for n, row in enumerate(incidents)}
        attached = db.execute(
            "SELECT incident_id, run_id FROM incident_failures WHERE rule = ? "
            "AND incident_id IS NOT NULL ORDER BY failed_at, run_id", [rule]).fetchall()
        events = db.execute(
            "SELECT e.incident_id, e.kind, e.occurred_at FROM incident_events e JOIN incidents i "
            "ON i.id = e.incident_id WHERE i.rule = ? ORDER BY e.occurred_at, e.rowid",
            [rule]).fetchall()
    finally:
        db.close()
    return {
        "incidents": [(group_of(key), status, count, opened, last, resolved)
                      for _, key, status, count, opened, last, resolved in incidents],
        "attached": sorted((ids[i], run) for i, run in attached),
        "transitions": [(ids[i], kind, at) for i, kind, at in events],
    }


def offline(rule: str, policy: Policy,
            verdicts: list[tuple[RunPassed | RunFailed, bool]]) -> dict[str, Any]:
    book = IncidentBook(lambda name: policy, lambda failure: f"{rule} failed")
    for verdict, _ in verdicts:
        if isinstance(verdict, RunPassed):
            book.passed(verdict)
        else:
            book.failed(verdict)
    ids = {b.incident.id: n for n, b in enumerate(book.incidents)}
    return {
        "incidents": [(b.group, b.status.value, b.failure_count, b.opened_at, b.last_failure,
                       b.resolved_at) for b in book.incidents],
        "attached": sorted((ids[b.incident.id], run) for b in book.incidents
                           for run in b.run_ids),
        "transitions": [(ids[t.incident_id], t.kind, t.at) for t in book.transitions],
    }


@seed(20261201)
@settings(max_examples=200, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(policy=policies, plan=steps)
def test_the_store_and_the_offline_path_open_the_same_incidents(
    store: Store, policy: Policy, plan: list[Step]
) -> None:
    rule = f"rule-{next(_example)}"
    verdicts = verdicts_of(rule, plan)
    assert online(store, rule, policy, verdicts) == offline(rule, policy, verdicts)


def test_the_reported_disagreement_is_gone(store: Store) -> None:
    """open_after 2, resolve_after 2, F P F F P F F F P P F: 5 failures in the incident (the
    first, broken streak's failure stays out), resolved, the last failure held back."""
    policy = Policy(open_after=2, resolve_after=2)
    plan = [Step(0, c == "F", 1, cut=i % 3 == 0) for i, c in enumerate("FPFFPFFFPPF")]
    rule = f"rule-{next(_example)}"
    verdicts = verdicts_of(rule, plan)
    result = online(store, rule, policy, verdicts)
    assert result == offline(rule, policy, verdicts)
    [(_, status, count, *_)] = result["incidents"]
    assert (status, count) == ("resolved", 5)
    assert [kind for _, kind, _ in result["transitions"]] == ["opened", "resolved"]


def test_one_group_key_for_non_ascii_and_nan_values() -> None:
    assert group_key((("customer.id", "Zoë-ß"),)) == '{"customer.id": "Zoë-ß"}'
    assert group_key((("amount", float("nan")),)) == '{"amount": "NaN"}'
    assert group_key(()) == ""


def test_a_failure_found_open_again_is_not_counted_twice(store: Store) -> None:
    rule = f"rule-{next(_example)}"
    [(failure, _)] = verdicts_of(rule, [Step(0, True, 1, cut=True)])
    batch = VerdictBatch([RunOpened(failure.run_id, rule, failure.trace_id, "",
                                    failure.opened_at, None), Judged(failure, summary="x")],
                         policies={rule: Policy()})
    asyncio.run(store.write_verdicts_and_wait(batch))
    # The run's verdict is lost (its row open again) while its failure row stayed.
    asyncio.run(store.run(lambda db: db.execute(
        "UPDATE runs SET status = 'open' WHERE id = ?", [failure.run_id])))
    written = asyncio.run(store.write_verdicts_and_wait(
        VerdictBatch([Judged(failure, summary="x")], policies={rule: Policy()})))
    assert failure.run_id not in written.claimed
    rows = store.conn.cursor().execute(
        "SELECT count(*), max(i.failure_count) FROM incident_failures f JOIN incidents i "
        "ON i.id = f.incident_id WHERE f.rule = ?", [rule]).fetchall()
    assert rows == [(1, 1)]


def test_a_verdict_backlog_over_its_bound_refuses_new_spans(tmp_path: Path) -> None:
    """Verdicts are never refused, but while too many wait to be written new exports are
    (Overloaded: UNAVAILABLE / 503 with Retry-After), until the writer catches up."""
    from outcomewatch.clock import ManualClock
    from outcomewatch.errors import Overloaded
    from outcomewatch.otlp import SpanBatch
    from tests.test_server_ordering import spans

    store = Store(str(tmp_path / "ow.duckdb"), max_queue=10)  # verdicts bound: 4096
    release = threading.Event()
    try:
        store.submit(lambda db: release.wait(30))  # holds the writer
        opened = [RunOpened(f"run-{i}", "r", f"{i:032x}", "", T0, None) for i in range(5000)]
        store.write_verdicts(VerdictBatch(list(opened)))
        batch: SpanBatch = spans(ManualClock(T0), (1, 1, "order.placed"))
        with pytest.raises(Overloaded, match="verdict backlog"):
            asyncio.run(store.append_spans(batch))
        release.set()
        asyncio.run(store.run(lambda db: None))  # the backlog is written
        asyncio.run(store.append_spans(batch))
    finally:
        release.set()
        store.close()
