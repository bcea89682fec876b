"""A person's acknowledge / resolve / reopen, and the snapshots of firing incidents, in the
writer's transaction. What a transition does is the lifecycle's (incidents/lifecycle.py); this
module only loads the incident, stores the result with a conditional update (``... WHERE
status = <what it was>``, so a repeated call never acts twice) and writes the timeline row and
one outbox row per notification target of the incident's route in the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb

from outcomewatch.incidents.lifecycle import SYSTEM, Action, applies_to
from outcomewatch.incidents.lifecycle import act as lifecycle_act
from outcomewatch.store import verdicts

__all__ = ["SYSTEM", "Action", "ActionResult", "act", "applies_to", "firing_snapshots"]

log = logging.getLogger(__name__)

_SELECT = f"SELECT {verdicts.INCIDENT_COLUMNS} FROM incidents"


@dataclass(frozen=True, slots=True)
class ActionResult:
    """``status`` is the incident's status after the call; None when there is no such incident.
    ``changed`` is False when the incident was not in a state the action applies to."""

    status: str | None
    changed: bool


def firing_snapshots(db: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Snapshots of the incidents open or acknowledged (whose alerts are firing)."""
    rows = db.execute(f"{_SELECT} WHERE status IN ('open', 'acknowledged') ORDER BY id").fetchall()
    return [verdicts.incident_of(row).snapshot() for row in rows]


def act(
    db: duckdb.DuckDBPyConnection, incident_id: int, action: Action, *, at: datetime,
    actor: str, comment: str | None, targets_for_route: Mapping[str, tuple[str, ...]],
) -> ActionResult:
    """A person's acknowledge / resolve / reopen."""
    rows = db.execute(f"{_SELECT} WHERE id = ?", [incident_id]).fetchall()
    if not rows:
        return ActionResult(None, changed=False)
    before = verdicts.incident_of(rows[0])
    result = lifecycle_act(before, action, at=at, actor=actor, comment=comment)
    if result is None:
        return ActionResult(before.status.value, changed=False)
    after, transition = result
    changed = db.execute(
        "UPDATE incidents SET status = ?, resolved_at = ?, acknowledged_at = ?, "
        "episode_started_at = ? WHERE id = ? AND status = ? RETURNING id",
        [after.status.value, after.resolved_at, after.acknowledged_at, after.episode_started_at,
         incident_id, before.status.value],
    ).fetchall()
    if not changed:
        return ActionResult(before.status.value, changed=False)
    db.execute("INSERT INTO incident_events VALUES (?, ?, ?, ?, ?)",
               [incident_id, at, transition.kind, actor, comment])
    log.info("incident %d %s by %s: rule %s, group %s: %s", incident_id, transition.kind, actor,
             after.rule, after.group_key or "(none)", comment or after.summary)
    for outbox in verdicts.outbox_rows([transition], targets_for_route):
        db.execute(
            "INSERT INTO outbox (incident_id, transition, target, route, payload, status, "
            "created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
            [outbox["incident_id"], outbox["transition"], outbox["target"], outbox["route"],
             outbox["payload"], at, at])
    return ActionResult(after.status.value, changed=True)
