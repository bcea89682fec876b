"""A verdict batch written set-based: everything the engine decided between two writes, stored
with a handful of statements over Arrow tables in the writer's transaction.

    1. runs: one INSERT ... ON CONFLICT DO NOTHING RETURNING id of every run the batch names, with
       its final status when the batch decides it (a run opened and judged in one batch costs one
       row written); then one UPDATE ... FROM ... WHERE status = 'open' RETURNING id for the
       verdicts of runs stored open earlier. A verdict is *claimed* when one of the two returns
       it; only claimed verdicts count, so a verdict given twice (a restart, a re-sent trigger)
       counts once, as healthchecks claims work with a conditional update.
    2. the states of the (rule, group) pairs the claimed verdicts touch: one SELECT of their
       flap-control streaks, one of their latest incidents.
    3. the lifecycle (incidents/lifecycle.py, pure) applies the claimed verdicts in order.
    4. writes: streaks and incidents updated where stored and inserted where new (the batch
       knows which: an UPDATE ... FROM costs a fraction of an INSERT ... ON CONFLICT DO
       UPDATE), failures inserted (with the incident they count in), runs' incident ids,
       timeline rows, outbox rows (one per transition and target), search keys, late outcomes;
       and the batch's watermark (verdict_state, see pipeline.py). A statement whose incoming
       rows are empty is not made. The incoming tables' schemas are in store/incoming.py.

So a batch costs a fixed number of statements plus one per new incident (its id), whatever the
number of runs in it; the statement costs grow with the (rule, group) pairs touched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb

from outcomewatch import jsonsafe
from outcomewatch.incidents.lifecycle import (
    GroupId,
    GroupState,
    Incident,
    Lifecycle,
    Policy,
    Transition,
    group_key,
)
from outcomewatch.model import (
    IncidentStatus,
    LateOutcome,
    RunAtRisk,
    RunFailed,
    RunOpened,
    RunPassed,
)
from outcomewatch.store.incoming import (
    AT_RISK,
    ATTACHED,
    EVENTS,
    FAILURES,
    GROUPS,
    INCIDENTS,
    LATE,
    OUTBOX,
    RUNS,
    STATES,
    Keys,
    table,
    unregister,
)

log = logging.getLogger(__name__)

INCIDENT_COLUMNS = ", ".join(INCIDENTS.names)


@dataclass(frozen=True, slots=True)
class Judged:
    """A verdict ready to store, with what the pipeline knows of it in memory."""

    verdict: RunPassed | RunFailed
    summary: str = ""  # failures: one line for lists and notifications
    detail: Mapping[str, Any] = field(default_factory=dict)  # failures: in-memory evidence
    keys: tuple[tuple[str, str], ...] = ()  # evidence values to find the run by


BatchEvent = RunOpened | Judged | LateOutcome | RunAtRisk


@dataclass
class VerdictBatch:
    """What the engine decided between two writes, in its order, with the lifecycle's policy
    of every rule named (by rule name) and the notification targets of every route; and, when
    set, the received_ns before which every span's consequences are in this batch or stored
    before it (verdict_state, read by a restart)."""

    events: list[BatchEvent] = field(default_factory=list)
    policies: dict[str, Policy] = field(default_factory=dict)
    targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    observed_before_ns: int | None = None

    def __len__(self) -> int:
        """Events, plus one for a watermark to store (a batch of len 0 writes nothing)."""
        return len(self.events) + (self.observed_before_ns is not None)

    def extend(self, other: VerdictBatch) -> None:
        """Append ``other``, the later batch: its watermark, if it has one, replaces ours."""
        self.events.extend(other.events)
        self.policies.update(other.policies)
        self.targets.update(other.targets)
        if other.observed_before_ns is not None:
            self.observed_before_ns = other.observed_before_ns


@dataclass(frozen=True, slots=True)
class Written:
    """What a batch changed: claimed verdicts (by run id) and the transitions made."""

    claimed: frozenset[str]
    transitions: tuple[Transition, ...]


def write(db: duckdb.DuckDBPyConnection, batch: VerdictBatch) -> Written:
    """Store ``batch`` on ``db`` (inside the caller's transaction)."""
    runs, keys, verdicts = _run_rows(batch.events)
    claimed = _claim(db, runs, keys, verdicts)
    claimed -= _counted_already(db, verdicts, claimed)
    states, stored_streaks = _load_states(db, verdicts, claimed)
    lifecycle = Lifecycle(states, lambda: _next_id(db))
    failures: list[dict[str, Any]] = []
    keys_of_failures = Keys()
    for judged in verdicts:
        verdict = judged.verdict
        if verdict.run_id not in claimed:
            continue
        group = (verdict.rule, group_key(verdict.group))
        policy = batch.policies.get(verdict.rule, Policy())
        if isinstance(verdict, RunPassed):
            lifecycle.passed(group, at=verdict.closed_at, policy=policy)
            continue
        lifecycle.failed(group, verdict.run_id, at=verdict.closed_at, summary=judged.summary,
                         policy=policy)
        failures.append({
            "incident_id": None, "run_id": verdict.run_id, "rule": verdict.rule,
            "trace_id": verdict.trace_id, "failed_at": verdict.closed_at,
            "reason": verdict.reason.value, "missing": list(verdict.missing),
            "detail": jsonsafe.dumps(dict(judged.detail)), "group_key": group[1],
        })
        keys_of_failures.add(verdict.run_id, judged.keys)
    # Attached now or later in this batch (a held failure joins the incident its streak opens).
    attached = dict(lifecycle.attached)
    for failure in failures:
        failure["incident_id"] = attached.get(failure["run_id"])
    _write_lifecycle(db, lifecycle, stored_streaks, failures, batch.targets)
    if keys_of_failures:
        keys_of_failures.register(db, "incoming_failure_keys")
        db.execute("INSERT INTO run_keys SELECT * FROM incoming_failure_keys")
        unregister(db, "incoming_failure_keys")
    late = [e for e in batch.events if isinstance(e, LateOutcome)]
    if late:
        _record_late(db, late)
    at_risk = [e for e in batch.events if isinstance(e, RunAtRisk)]
    if at_risk:
        _record_at_risk(db, at_risk)
    for transition in lifecycle.transitions:
        incident = lifecycle.changed[transition.incident_id]
        log.info("incident %d %s: rule %s, group %s: %s", transition.incident_id,
                 transition.kind, incident.rule, incident.group_key or "(none)",
                 transition.comment or incident.summary)
    if batch.observed_before_ns is not None:
        # Overwritten, not greatest(): after a restart on a clock that went back, the new
        # process's watermark is the true one.
        db.execute("UPDATE verdict_state SET observed_before_ns = ?", [batch.observed_before_ns])
    return Written(frozenset(claimed), tuple(lifecycle.transitions))


def _run_rows(
    events: Sequence[BatchEvent],
) -> tuple[dict[str, dict[str, Any]], Keys, list[Judged]]:
    """One row per run named (its final state within the batch), the search keys of opened runs,
    and the verdicts, first one per run, in order."""
    runs: dict[str, dict[str, Any]] = {}
    keys = Keys()
    verdicts: list[Judged] = []
    decided: set[str] = set()
    for event in events:
        if isinstance(event, RunOpened):
            if event.run_id not in runs:
                runs[event.run_id] = {
                    "id": event.run_id, "rule": event.rule, "trace_id": event.trace_id,
                    "trigger_span_id": event.trigger_span_id, "status": "open",
                    "opened_at": event.opened_at, "deadline_at": event.deadline_at,
                    "closed_at": None, "reason": None, "missing": [], "group_key": "",
                }
                keys.add(event.run_id, event.keys)
        elif isinstance(event, Judged):
            verdict = event.verdict
            if verdict.run_id in decided:
                continue
            decided.add(verdict.run_id)
            verdicts.append(event)
            row = runs.get(verdict.run_id)
            if row is None:  # opened in an earlier batch (or its open was never stored)
                trigger = verdict.trigger.span_id if (
                    isinstance(verdict, RunFailed) and verdict.trigger is not None) else ""
                row = runs[verdict.run_id] = {
                    "id": verdict.run_id, "rule": verdict.rule, "trace_id": verdict.trace_id,
                    "trigger_span_id": trigger, "opened_at": verdict.opened_at,
                    "deadline_at": None,
                }
            failed = isinstance(verdict, RunFailed)
            row.update(
                status="failed" if failed else "passed", closed_at=verdict.closed_at,
                reason=verdict.reason.value if isinstance(verdict, RunFailed) else None,
                missing=list(verdict.missing) if isinstance(verdict, RunFailed) else [],
                group_key=group_key(verdict.group),
            )
    return runs, keys, verdicts


def _claim(
    db: duckdb.DuckDBPyConnection, runs: dict[str, dict[str, Any]], keys: Keys,
    verdicts: list[Judged],
) -> set[str]:
    """Insert the runs not stored yet and close the open ones the batch decides; the run ids
    whose verdict this call stored."""
    if not runs:
        return set()
    table(db, "incoming_runs", list(runs.values()), RUNS)
    keys.register(db, "incoming_keys")
    try:
        inserted = {row[0] for row in db.execute(
            "INSERT INTO runs (id, rule, trace_id, trigger_span_id, status, opened_at, "
            "deadline_at, closed_at, reason, missing, group_key) "
            "SELECT * FROM incoming_runs ON CONFLICT DO NOTHING RETURNING id").fetchall()}
        if keys and inserted:
            # Keys only of runs new in this statement: a re-sent trigger adds no second set.
            # Usually every run is new, and the filter (a list scan per key) is not needed.
            if inserted.issuperset(keys.run_id):
                db.execute("INSERT INTO run_keys SELECT * FROM incoming_keys")
            else:
                db.execute("INSERT INTO run_keys SELECT * FROM incoming_keys WHERE "
                           "list_contains(?, run_id)", [sorted(inserted)])
        decided = {j.verdict.run_id for j in verdicts}
        claimed = decided & inserted
        pending = decided - inserted
        if pending:
            claimed |= {row[0] for row in db.execute(
                "UPDATE runs SET status = v.status, closed_at = v.closed_at, reason = v.reason, "
                "missing = v.missing, group_key = v.group_key FROM incoming_runs v "
                "WHERE runs.id = v.id AND v.status <> 'open' AND runs.status = 'open' "
                "RETURNING runs.id").fetchall()}
    finally:
        unregister(db, "incoming_runs", "incoming_keys")
    return claimed


def _counted_already(
    db: duckdb.DuckDBPyConnection, verdicts: list[Judged], claimed: set[str]
) -> set[str]:
    """Claimed failures that already have their incident_failures row. A claim should make this
    impossible; but a run whose stored verdict was lost (its row found open again, as after a
    crash that kept the failure row and not the run's update) must still never count twice."""
    failed = [j.verdict.run_id for j in verdicts
              if isinstance(j.verdict, RunFailed) and j.verdict.run_id in claimed]
    if not failed:
        return set()
    return {row[0] for row in db.execute(
        "SELECT run_id FROM incident_failures WHERE list_contains(?, run_id)", [failed]
    ).fetchall()}


def _next_id(db: duckdb.DuckDBPyConnection) -> int:
    [(value,)] = db.execute("SELECT nextval('incident_ids')").fetchall()
    return int(value)


def incident_of(row: Sequence[Any]) -> Incident:
    """An ``incidents`` row, selected as ``INCIDENT_COLUMNS``."""
    (id_, rule, status, severity, owner, route, opened_at, last_failure_at, failure_count,
     summary, resolved_at, description, key, acknowledged_at, episode_started_at) = row
    return Incident(
        int(id_), rule, key, IncidentStatus(status), severity, owner, route, summary,
        description, opened_at, last_failure_at, int(failure_count), resolved_at,
        acknowledged_at, episode_started_at)


def _load_states(
    db: duckdb.DuckDBPyConnection, verdicts: list[Judged], claimed: set[str]
) -> tuple[dict[GroupId, GroupState], set[GroupId]]:
    """The state of every group the claimed verdicts touch, and the groups with a stored
    rule_state row."""
    groups = sorted({(j.verdict.rule, group_key(j.verdict.group)) for j in verdicts
                     if j.verdict.run_id in claimed})
    if not groups:
        return {}, set()
    table(db, "touched_groups", [{"rule": r, "group_key": g} for r, g in groups], GROUPS)
    try:
        streaks = db.execute(
            "SELECT s.rule, s.group_key, consecutive_failures, consecutive_passes, held "
            "FROM rule_state s JOIN touched_groups USING (rule, group_key)").fetchall()
        latest = db.execute(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE id IN (SELECT max(i.id) "
            "FROM incidents i JOIN touched_groups USING (rule, group_key) "
            "GROUP BY i.rule, i.group_key)").fetchall()
    finally:
        unregister(db, "touched_groups")
    states = {(rule, key): GroupState(int(failures), int(passes), list(held or []))
              for rule, key, failures, passes, held in streaks}
    for row in latest:
        incident = incident_of(row)
        states.setdefault((incident.rule, incident.group_key), GroupState()).incident = incident
    return states, {(rule, key) for rule, key, *_ in streaks}


def _write_lifecycle(
    db: duckdb.DuckDBPyConnection, lifecycle: Lifecycle, stored_streaks: set[GroupId],
    failures: list[dict[str, Any]], targets: Mapping[str, tuple[str, ...]],
) -> None:
    names: list[str] = []
    try:
        # Rows that exist are updated and new ones inserted, each only when there are any:
        # the batch knows which is which (what _load_states read, what the lifecycle created),
        # and an UPDATE ... FROM costs a fraction of an INSERT ... ON CONFLICT DO UPDATE.
        states = [{"rule": rule, "group_key": key, "consecutive_failures": s.failures,
                   "consecutive_passes": s.passes, "held": s.held}
                  for (rule, key) in sorted(lifecycle.touched)
                  for s in (lifecycle.states[(rule, key)],)]
        stored, fresh = _split(states,
                               lambda row: (row["rule"], row["group_key"]) in stored_streaks)
        if stored:
            names.append("stored_states")
            table(db, "stored_states", stored, STATES)
            db.execute(
                "UPDATE rule_state SET consecutive_failures = s.consecutive_failures, "
                "consecutive_passes = s.consecutive_passes, held = s.held FROM stored_states s "
                "WHERE rule_state.rule = s.rule AND rule_state.group_key = s.group_key")
        if fresh:
            names.append("new_states")
            table(db, "new_states", fresh, STATES)
            db.execute("INSERT INTO rule_state SELECT * FROM new_states")
        updated, created = _split([_incident_row(i) for i in lifecycle.changed.values()],
                                  lambda row: row["id"] not in lifecycle.created)
        if updated:
            names.append("changed_incidents")
            table(db, "changed_incidents", updated, INCIDENTS)
            db.execute(
                "UPDATE incidents SET status = c.status, last_failure_at = c.last_failure_at, "
                "failure_count = c.failure_count, summary = c.summary, "
                "resolved_at = c.resolved_at, acknowledged_at = c.acknowledged_at, "
                "episode_started_at = c.episode_started_at FROM changed_incidents c "
                "WHERE incidents.id = c.id")
        if created:
            names.append("new_incidents")
            table(db, "new_incidents", created, INCIDENTS)
            db.execute(f"INSERT INTO incidents ({INCIDENT_COLUMNS}) SELECT * FROM new_incidents")
        if failures:
            names.append("incoming_failures")
            table(db, "incoming_failures", failures, FAILURES)
            db.execute("INSERT INTO incident_failures SELECT * FROM incoming_failures")
        if lifecycle.attached:
            names.append("incoming_attached")
            table(db, "incoming_attached", [{"run_id": r, "incident_id": i}
                                             for r, i in lifecycle.attached], ATTACHED)
            # Failures held back by open_after in earlier batches join their incident now.
            new = {f["run_id"] for f in failures}
            earlier = [r for r, _ in lifecycle.attached if r not in new]
            if earlier:
                db.execute(
                    "UPDATE incident_failures SET incident_id = a.incident_id FROM "
                    "incoming_attached a WHERE incident_failures.run_id = a.run_id "
                    "AND incident_failures.incident_id IS NULL AND list_contains(?, a.run_id)",
                    [earlier])
            db.execute("UPDATE runs SET incident_id = a.incident_id FROM incoming_attached a "
                       "WHERE runs.id = a.run_id")
        if lifecycle.transitions:
            names.append("incoming_events")
            table(db, "incoming_events", [
                {"incident_id": t.incident_id, "occurred_at": t.at, "kind": t.kind,
                 "actor": t.actor, "comment": t.comment} for t in lifecycle.transitions
            ], EVENTS)
            db.execute("INSERT INTO incident_events SELECT * FROM incoming_events")
            outbox = outbox_rows(lifecycle.transitions, targets)
            if outbox:
                names.append("incoming_outbox")
                table(db, "incoming_outbox", outbox, OUTBOX)
                db.execute(
                    "INSERT INTO outbox (incident_id, transition, target, route, payload, "
                    "status, created_at, next_attempt_at) SELECT incident_id, transition, "
                    "target, route, payload, 'pending', created_at, created_at "
                    "FROM incoming_outbox")
    finally:
        unregister(db, *names)


def _split(rows: list[dict[str, Any]], stored: Callable[[dict[str, Any]], bool],
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``rows`` as (those already stored, the new ones), each in order."""
    kept: list[dict[str, Any]] = []
    new: list[dict[str, Any]] = []
    for row in rows:
        (kept if stored(row) else new).append(row)
    return kept, new


def _incident_row(incident: Incident) -> dict[str, Any]:
    return {
        "id": incident.id, "rule": incident.rule, "status": incident.status.value,
        "severity": incident.severity, "owner": incident.owner, "route": incident.route,
        "opened_at": incident.opened_at, "last_failure_at": incident.last_failure_at,
        "failure_count": incident.failure_count, "summary": incident.summary,
        "resolved_at": incident.resolved_at, "description": incident.description,
        "group_key": incident.group_key, "acknowledged_at": incident.acknowledged_at,
        "episode_started_at": incident.episode_started_at,
    }


def outbox_rows(
    transitions: Sequence[Transition], targets: Mapping[str, tuple[str, ...]]
) -> list[dict[str, Any]]:
    """One outbox row per transition and target of its incident's route, each carrying the
    incident as it was at that transition."""
    rows: list[dict[str, Any]] = []
    for t in transitions:
        route = str(t.snapshot["route"])
        payload = jsonsafe.dumps(t.snapshot | {"transition": t.kind, "comment": t.comment,
                                               "actor": t.actor})
        rows.extend({"incident_id": t.incident_id, "transition": t.kind, "target": target,
                     "route": route, "payload": payload, "created_at": t.at}
                    for target in targets.get(route, ()))
    return rows


def _record_late(db: duckdb.DuckDBPyConnection, late: list[LateOutcome]) -> None:
    """Outcomes that arrived after their run's verdict: kept on the run and in its incident's
    timeline (once per run and outcome); the failure stands."""
    ids = sorted({e.run_id for e in late})
    current = {row[0]: (row[1], list(row[2])) for row in db.execute(
        "SELECT id, incident_id, late_outcomes FROM runs WHERE status = 'failed' AND "
        "list_contains(?, id)", [ids]).fetchall()}
    updates: dict[str, tuple[list[str], datetime]] = {}
    events: list[dict[str, Any]] = []
    for event in late:
        if event.run_id not in current:
            continue
        incident_id, outcomes = current[event.run_id]
        if event.outcome in outcomes:
            continue
        outcomes.append(event.outcome)
        updates[event.run_id] = (outcomes, event.at)
        if incident_id is not None:
            events.append({"incident_id": int(incident_id), "occurred_at": event.at,
                           "kind": "late_outcome", "actor": "outcomewatch",
                           "comment": f"{event.outcome} arrived after run {event.run_id} "
                                      "failed"})
    if updates:
        table(db, "incoming_late", [{"id": run_id, "outcomes": outcomes, "at": at}
                                     for run_id, (outcomes, at) in updates.items()], LATE)
        try:
            db.execute("UPDATE runs SET late_outcomes = l.outcomes, late_at = l.at FROM "
                       "incoming_late l WHERE runs.id = l.id")
        finally:
            unregister(db, "incoming_late")
    if events:
        table(db, "incoming_late_events", events, EVENTS)
        try:
            db.execute("INSERT INTO incident_events SELECT * FROM incoming_late_events")
        finally:
            unregister(db, "incoming_late_events")


MAX_AT_RISK_STORED = 10  # near misses kept per run


def _record_at_risk(db: duckdb.DuckDBPyConnection, events: list[RunAtRisk]) -> None:
    """Append the spans that put runs at risk to ``runs.at_risk`` (JSON, bounded)."""
    ids = sorted({e.run_id for e in events})
    current = {row[0]: json.loads(row[1]) if row[1] else [] for row in db.execute(
        "SELECT id, at_risk FROM runs WHERE list_contains(?, id)", [ids]).fetchall()}
    for event in events:
        spans = current.get(event.run_id)
        if spans is not None and len(spans) < MAX_AT_RISK_STORED:
            spans.append({"name": event.span, "status_message": event.status_message})
    table(db, "incoming_at_risk", [{"id": run_id, "at_risk": jsonsafe.dumps(spans)}
                                    for run_id, spans in current.items()], AT_RISK)
    try:
        db.execute("UPDATE runs SET at_risk = r.at_risk FROM incoming_at_risk r "
                   "WHERE runs.id = r.id")
    finally:
        unregister(db, "incoming_at_risk")
