"""Incident lifecycle, as SQL run inside the writer's transaction.

    (failures) --open_after reached--> open --acknowledge--> acknowledged
         open / acknowledged --resolve (a person, or resolve_after passes)--> resolved
         resolved --reopen (a person, or a failure within reopen_window)--> open

Every transition is a row in ``incident_events`` (who, when, why) and, in the same transaction,
one ``outbox`` row per notification target of the rule's route, so a notification is never lost
and never written twice. Work is claimed with conditional updates (``... WHERE status = 'open'
RETURNING id``) in the manner of healthchecks, so a restart or a repeated call never acts twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import duckdb

from outcomewatch import jsonsafe
from outcomewatch.model import RunFailed

SYSTEM = "outcomewatch"


class Action(StrEnum):
    ACKNOWLEDGE = "acknowledge"
    RESOLVE = "resolve"
    REOPEN = "reopen"


# For each action: the statuses it may start from, the status it leads to, the event's kind.
_TRANSITIONS: dict[Action, tuple[tuple[str, ...], str, str]] = {
    Action.ACKNOWLEDGE: (("open",), "acknowledged", "acknowledged"),
    Action.RESOLVE: (("open", "acknowledged"), "resolved", "resolved"),
    Action.REOPEN: (("resolved",), "open", "reopened"),
}


def applies_to(action: Action) -> tuple[str, ...]:
    """The incident statuses ``action`` may start from."""
    return _TRANSITIONS[action][0]


@dataclass(frozen=True, slots=True)
class IncidentFacts:
    """What the incident needs from the rule and the config, without the store importing them."""

    severity: str
    owner: str
    route: str
    summary: str
    description: str = ""
    group_key: str = ""
    open_after: int = 1
    resolve_after: int | None = None
    reopen_window: timedelta = timedelta(hours=24)
    targets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ActionResult:
    """``status`` is the incident's status after the call; None when there is no such incident.
    ``changed`` is False when the incident was not in a state the action applies to."""

    status: str | None
    changed: bool


_SNAPSHOT = (
    "SELECT id, rule, status, severity, owner, route, summary, description, group_key, "
    "epoch_us(opened_at), epoch_us(last_failure_at), epoch_us(resolved_at), failure_count, "
    # The start of the current firing episode: its latest opening or re-opening (startsAt).
    "(SELECT epoch_us(max(e.occurred_at)) FROM incident_events e "
    "WHERE e.incident_id = incidents.id AND e.kind IN ('opened', 'reopened')) "
    "FROM incidents WHERE id = ?"
)


def _iso(epoch_us: int | None) -> str | None:
    if epoch_us is None:
        return None
    moment = datetime.fromtimestamp(epoch_us / 1e6, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _snapshot(db: duckdb.DuckDBPyConnection, incident_id: int) -> dict[str, Any]:
    row = db.execute(_SNAPSHOT, [incident_id]).fetchone()
    assert row is not None
    return _snapshot_of(row)


def firing_snapshots(db: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Snapshots of the incidents open or acknowledged (whose alerts are firing)."""
    rows = db.execute(
        _SNAPSHOT.replace("WHERE id = ?", "WHERE status IN ('open', 'acknowledged') ORDER BY id")
    ).fetchall()
    return [_snapshot_of(row) for row in rows]


def _snapshot_of(row: tuple[Any, ...]) -> dict[str, Any]:
    group = json.loads(row[8]) if row[8] else {}
    return {
        "id": row[0], "rule": row[1], "status": row[2], "severity": row[3], "owner": row[4],
        "route": row[5], "summary": row[6], "description": row[7], "group": group,
        "opened_at": _iso(row[9]), "last_failure_at": _iso(row[10]),
        "resolved_at": _iso(row[11]), "failure_count": row[12],
        "episode_started_at": _iso(row[13]),
    }


def _transition(
    db: duckdb.DuckDBPyConnection, incident_id: int, *, kind: str, at: datetime, actor: str,
    comment: str | None, targets: tuple[str, ...],
) -> None:
    """The timeline row and the outbox rows of one transition that has just been made."""
    db.execute("INSERT INTO incident_events VALUES (?, ?, ?, ?, ?)",
               [incident_id, at, kind, actor, comment])
    if not targets:
        return
    payload = _snapshot(db, incident_id) | {"transition": kind, "comment": comment,
                                              "actor": actor}
    for target in targets:
        db.execute(
            "INSERT INTO outbox (incident_id, transition, target, route, payload, status, "
            "created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
            [incident_id, kind, target, payload["route"], jsonsafe.dumps(payload), at, at],
        )


def record_failure(
    db: duckdb.DuckDBPyConnection, failure: RunFailed, facts: IncidentFacts,
    detail: dict[str, Any],
) -> int | None:
    """Store a failed verdict and count it. Returns the incident it belongs to, or None when the
    run already had a verdict or flap control (``open_after``) still holds the incident back."""
    # The run may never have been stored as open (a crash in between); make sure it exists.
    db.execute(
        "INSERT INTO runs (id, rule, trace_id, trigger_span_id, status, opened_at, group_key) "
        "VALUES (?, ?, ?, ?, 'open', ?, ?) ON CONFLICT DO NOTHING",
        [failure.run_id, failure.rule, failure.trace_id,
         failure.trigger.span_id if failure.trigger is not None else "",
         failure.opened_at, facts.group_key],
    )
    claimed = db.execute(
        "UPDATE runs SET status = 'failed', closed_at = ?, reason = ?, missing = ? "
        "WHERE id = ? AND status = 'open' RETURNING id",
        [failure.closed_at, failure.reason.value, list(failure.missing), failure.run_id],
    ).fetchone()
    if claimed is None:
        return None
    streak = db.execute(
        "INSERT INTO rule_state VALUES (?, ?, 1, 0) ON CONFLICT (rule, group_key) DO UPDATE "
        "SET consecutive_failures = rule_state.consecutive_failures + 1, consecutive_passes = 0 "
        "RETURNING consecutive_failures",
        [failure.rule, facts.group_key],
    ).fetchone()
    assert streak is not None
    db.execute(
        "INSERT INTO incident_failures (incident_id, run_id, rule, trace_id, failed_at, reason, "
        "missing, detail, group_key) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
        [failure.run_id, failure.rule, failure.trace_id, failure.closed_at,
         failure.reason.value, list(failure.missing), jsonsafe.dumps(detail),
         facts.group_key],
    )
    consecutive = int(streak[0])
    incident_id, transition = _current_incident(db, failure, facts, consecutive=consecutive)
    if incident_id is None:
        return None
    # A new or re-opened incident takes the failures of the streak that opened it (flap
    # control held them back); an open one takes this failure. Failures of an earlier, broken
    # streak stay unattached: they never reached open_after.
    attached = db.execute(
        "UPDATE incident_failures SET incident_id = ? WHERE run_id IN (SELECT run_id "
        "FROM incident_failures WHERE rule = ? AND group_key = ? AND incident_id IS NULL "
        "ORDER BY failed_at DESC, run_id DESC LIMIT ?) RETURNING run_id",
        [incident_id, failure.rule, facts.group_key, min(consecutive, facts.open_after)
         if transition else 1],
    ).fetchall()
    db.execute(
        "UPDATE incidents SET failure_count = failure_count + ?, last_failure_at = ?, summary = ? "
        "WHERE id = ?",
        [len(attached), failure.closed_at, facts.summary, incident_id],
    )
    db.execute("UPDATE runs SET incident_id = ? WHERE list_contains(?, id)",
               [incident_id, [r[0] for r in attached]])
    if transition is not None:  # announced with the counts it opened with
        comment = facts.summary if transition == "opened" else f"failed again: {facts.summary}"
        _transition(db, incident_id, kind=transition, at=failure.closed_at, actor=SYSTEM,
                    comment=comment, targets=facts.targets)
    return incident_id


def _current_incident(
    db: duckdb.DuckDBPyConnection, failure: RunFailed, facts: IncidentFacts, *, consecutive: int
) -> tuple[int | None, str | None]:
    """The incident this failure counts in: the open one, a recently resolved one re-opened, or
    a new one once ``open_after`` consecutive failures are reached; and the transition made
    ("opened", "reopened", or None), to be announced once the failures are attached."""
    row = db.execute(
        "SELECT id FROM incidents WHERE rule = ? AND group_key = ? "
        "AND status IN ('open', 'acknowledged')",
        [failure.rule, facts.group_key],
    ).fetchone()
    if row is not None:
        return int(row[0]), None
    if consecutive < facts.open_after:
        return None, None
    reopened = db.execute(
        "UPDATE incidents SET status = 'open', resolved_at = NULL, acknowledged_at = NULL "
        "WHERE id = (SELECT max(id) FROM incidents WHERE rule = ? AND group_key = ? "
        "AND status = 'resolved' AND resolved_at >= ?) RETURNING id",
        [failure.rule, facts.group_key, failure.closed_at - facts.reopen_window],
    ).fetchone()
    if reopened is not None:
        return int(reopened[0]), "reopened"
    created = db.execute(
        "INSERT INTO incidents (rule, status, severity, owner, route, opened_at, last_failure_at, "
        "failure_count, summary, description, group_key) "
        "VALUES (?, 'open', ?, ?, ?, ?, ?, 0, ?, ?, ?) RETURNING id",
        [failure.rule, facts.severity, facts.owner, facts.route, failure.closed_at,
         failure.closed_at, facts.summary, facts.description, facts.group_key],
    ).fetchone()
    assert created is not None
    return int(created[0]), "opened"


def record_passes(
    db: duckdb.DuckDBPyConnection, rule: str, group_key: str, passes: int, *, at: datetime,
    resolve_after: int | None, targets: tuple[str, ...],
) -> None:
    """Count passed runs; ``resolve_after`` consecutive passes resolve the open incident."""
    streak = db.execute(
        "INSERT INTO rule_state VALUES (?, ?, 0, ?) ON CONFLICT (rule, group_key) DO UPDATE "
        "SET consecutive_passes = rule_state.consecutive_passes + ?, consecutive_failures = 0 "
        "RETURNING consecutive_passes",
        [rule, group_key, passes, passes],
    ).fetchone()
    assert streak is not None
    if resolve_after is None or int(streak[0]) < resolve_after:
        return
    resolved = db.execute(
        "UPDATE incidents SET status = 'resolved', resolved_at = ? WHERE rule = ? "
        "AND group_key = ? AND status IN ('open', 'acknowledged') RETURNING id",
        [at, rule, group_key],
    ).fetchone()
    if resolved is not None:
        _transition(db, int(resolved[0]), kind="resolved", at=at, actor=SYSTEM,
                    comment=f"{int(streak[0])} consecutive passed runs", targets=targets)


def act(
    db: duckdb.DuckDBPyConnection, incident_id: int, action: Action, *, at: datetime,
    actor: str, comment: str | None, targets_for_route: dict[str, tuple[str, ...]],
) -> ActionResult:
    """A person's acknowledge / resolve / reopen."""
    sources, target_status, kind = _TRANSITIONS[action]
    # A reopen by hand is no new failure: last_failure_at stays (the ``? IS NOT NULL`` only
    # keeps one parameter list for the three statements).
    stamp = {"acknowledged": "acknowledged_at = ?", "resolved": "resolved_at = ?",
             "open": "resolved_at = NULL, acknowledged_at = NULL, "
                     "last_failure_at = CASE WHEN ? IS NOT NULL THEN last_failure_at END"}
    changed = db.execute(
        # Only fixed strings are formatted in; every value is a parameter.
        f"UPDATE incidents SET status = ?, {stamp[target_status]} "
        "WHERE id = ? AND list_contains(?, status) RETURNING route",
        [target_status, at, incident_id, list(sources)],
    ).fetchone()
    if changed is None:
        current = db.execute("SELECT status FROM incidents WHERE id = ?", [incident_id]).fetchone()
        return ActionResult(None if current is None else str(current[0]), changed=False)
    _transition(db, incident_id, kind=kind, at=at, actor=actor, comment=comment,
                targets=targets_for_route.get(str(changed[0]), ()))
    return ActionResult(target_status, changed=True)


def record_late_outcome(
    db: duckdb.DuckDBPyConnection, run_id: str, outcome: str, *, at: datetime
) -> None:
    """An expected outcome that arrived after the run's verdict: kept on the run and in the
    incident's timeline; the failure stands."""
    row = db.execute(
        "UPDATE runs SET late_outcomes = list_append(late_outcomes, ?), late_at = ? "
        "WHERE id = ? AND status = 'failed' AND NOT list_contains(late_outcomes, ?) "
        "RETURNING incident_id",
        [outcome, at, run_id, outcome],
    ).fetchone()
    if row is not None and row[0] is not None:
        db.execute("INSERT INTO incident_events VALUES (?, ?, 'late_outcome', ?, ?)",
                   [int(row[0]), at, SYSTEM, f"{outcome} arrived after run {run_id} failed"])
