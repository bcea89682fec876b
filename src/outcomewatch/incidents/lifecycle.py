"""The incident lifecycle: one pure state machine, used by the server's verdict writer and by
``outcomewatch test`` / ``replay``, so the two can never disagree about an incident.

    (failures) --open_after reached--> open --acknowledge--> acknowledged
         open / acknowledged --resolve (a person, or resolve_after consecutive passes)--> resolved
         resolved --reopen (a person, or open_after failures within the reopen window)--> open

Per (rule, group key) the state is a :class:`GroupState`: the consecutive failures and passes,
the *held* failures (run ids of the current failure streak not yet in any incident: flap control
holds them back until ``open_after`` is reached) and the group's latest incident.

Verdicts are applied in the engine's order, and only verdicts that were *claimed* (stored for the
first time) may be applied: a verdict given twice must count once. For each verdict:

- a failure adds to the failure streak, resets the pass streak and is held; if the group's
  incident is open or acknowledged, the held failures are attached to it; otherwise, once the
  streak reaches ``open_after``, the latest incident is re-opened if it was resolved within the
  reopen window (``resolved_at >= failed_at - reopen_window``), else a new one is opened, and the
  held failures are attached. Failures of a streak broken by a pass stay unattached for good.
- a pass adds to the pass streak, resets the failure streak and drops the held failures; with
  ``resolve_after``, that many consecutive passes resolve the open or acknowledged incident.

Nothing here does I/O: the caller hands in the states of the groups a batch touches and a way to
number new incidents, and reads back what changed (:class:`Lifecycle` ``changed``,
``attached``, ``transitions``). A person's acknowledge / resolve / reopen is :func:`act`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from outcomewatch import jsonsafe
from outcomewatch.model import GroupValues, IncidentStatus

SYSTEM = "outcomewatch"  # the actor of transitions made by verdicts
DEFAULT_REOPEN_WINDOW = timedelta(hours=24)


def group_key(group: GroupValues) -> str:
    """The stored key of a group_by value set: canonical JSON ('' for an ungrouped rule). The
    one place it is computed: strict JSON (NaN and infinities as strings), non-ASCII kept."""
    return jsonsafe.dumps(dict(group), sort_keys=True) if group else ""


def group_of(key: str) -> dict[str, Any]:
    """The group_by values of a stored key ({} when ungrouped or unreadable)."""
    try:
        group = json.loads(key) if key else {}
    except ValueError:
        return {}
    return group if isinstance(group, dict) else {}


class Action(StrEnum):
    ACKNOWLEDGE = "acknowledge"
    RESOLVE = "resolve"
    REOPEN = "reopen"


# For each action: the statuses it may start from, the status it leads to, the event's kind.
TRANSITIONS: dict[Action, tuple[tuple[IncidentStatus, ...], IncidentStatus, str]] = {
    Action.ACKNOWLEDGE: ((IncidentStatus.OPEN,), IncidentStatus.ACKNOWLEDGED, "acknowledged"),
    Action.RESOLVE: ((IncidentStatus.OPEN, IncidentStatus.ACKNOWLEDGED), IncidentStatus.RESOLVED,
                     "resolved"),
    Action.REOPEN: ((IncidentStatus.RESOLVED,), IncidentStatus.OPEN, "reopened"),
}


def applies_to(action: Action) -> tuple[str, ...]:
    """The incident statuses ``action`` may start from."""
    return tuple(status.value for status in TRANSITIONS[action][0])


@dataclass(frozen=True, slots=True)
class Policy:
    """What the lifecycle needs of a rule (and the config), without importing either."""

    severity: str = "warning"
    owner: str = ""
    route: str = ""
    description: str = ""
    open_after: int = 1
    resolve_after: int | None = None
    reopen_window: timedelta = DEFAULT_REOPEN_WINDOW


@dataclass(slots=True)
class Incident:
    """An incident as stored (one row of ``incidents``)."""

    id: int
    rule: str
    group_key: str
    status: IncidentStatus
    severity: str
    owner: str
    route: str
    summary: str
    description: str
    opened_at: datetime
    last_failure_at: datetime
    failure_count: int = 0
    resolved_at: datetime | None = None
    acknowledged_at: datetime | None = None
    episode_started_at: datetime | None = None  # the latest opening or re-opening

    @property
    def firing(self) -> bool:
        return self.status is not IncidentStatus.RESOLVED

    def snapshot(self) -> dict[str, Any]:
        """The incident as notifications carry it (the outbox payload, before the transition's
        own fields are added)."""
        return {
            "id": self.id, "rule": self.rule, "status": self.status.value,
            "severity": self.severity, "owner": self.owner, "route": self.route,
            "summary": self.summary, "description": self.description,
            "group": group_of(self.group_key), "opened_at": iso(self.opened_at),
            "last_failure_at": iso(self.last_failure_at), "resolved_at": iso(self.resolved_at),
            "failure_count": self.failure_count,
            "episode_started_at": iso(self.episode_started_at or self.opened_at),
        }


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 UTC with milliseconds and a Z, as the API writes times."""
    if moment is None:
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class GroupState:
    failures: int = 0  # consecutive
    passes: int = 0  # consecutive
    held: list[str] = field(default_factory=list)  # run ids of the streak, in no incident yet
    incident: Incident | None = None  # the group's latest incident


@dataclass(frozen=True, slots=True)
class Transition:
    incident_id: int
    kind: str  # opened, reopened, acknowledged, resolved
    at: datetime
    actor: str
    comment: str | None
    snapshot: dict[str, Any]  # the incident right after the transition (Incident.snapshot)


GroupId = tuple[str, str]  # (rule, group key)


class Lifecycle:
    """Applies claimed verdicts to the states it was handed (mutating them) and records what
    changed. ``new_id()`` numbers a new incident (a database sequence, or a counter)."""

    def __init__(self, states: dict[GroupId, GroupState], new_id: Callable[[], int]) -> None:
        self.states = states
        self._new_id = new_id
        self.touched: set[GroupId] = set()  # groups whose state changed
        self.changed: dict[int, Incident] = {}  # incidents created or changed, by id
        self.created: set[int] = set()
        self.attached: list[tuple[str, int]] = []  # (run id, incident id)
        self.transitions: list[Transition] = []

    def _state(self, group: GroupId) -> GroupState:
        self.touched.add(group)
        state = self.states.get(group)
        if state is None:
            state = self.states[group] = GroupState()
        return state

    def failed(
        self, group: GroupId, run_id: str, *, at: datetime, summary: str, policy: Policy
    ) -> int | None:
        """A claimed failure; returns the incident it counts in (None while held back)."""
        state = self._state(group)
        state.failures += 1
        state.passes = 0
        state.held.append(run_id)
        incident = state.incident
        kind: str | None = None
        if incident is None or not incident.firing:
            if state.failures < policy.open_after:
                return None
            if (incident is not None and incident.resolved_at is not None
                    and incident.resolved_at >= at - policy.reopen_window):
                incident.status = IncidentStatus.OPEN
                incident.resolved_at = incident.acknowledged_at = None
                incident.episode_started_at = at
                kind = "reopened"
            else:
                incident = Incident(
                    self._new_id(), group[0], group[1], IncidentStatus.OPEN, policy.severity,
                    policy.owner, policy.route, summary, policy.description, opened_at=at,
                    last_failure_at=at, episode_started_at=at)
                self.created.add(incident.id)
                state.incident = incident
                kind = "opened"
        incident.failure_count += len(state.held)
        incident.last_failure_at = at
        incident.summary = summary
        self.attached.extend((held, incident.id) for held in state.held)
        state.held = []
        self.changed[incident.id] = incident
        if kind is not None:  # announced with the counts it opened with
            comment = summary if kind == "opened" else f"failed again: {summary}"
            self.transitions.append(
                Transition(incident.id, kind, at, SYSTEM, comment, incident.snapshot()))
        return incident.id

    def passed(self, group: GroupId, *, at: datetime, policy: Policy) -> None:
        """A claimed pass."""
        state = self._state(group)
        state.passes += 1
        state.failures = 0
        state.held = []
        incident = state.incident
        if (policy.resolve_after is not None and state.passes >= policy.resolve_after
                and incident is not None and incident.firing):
            incident.status = IncidentStatus.RESOLVED
            incident.resolved_at = at
            self.changed[incident.id] = incident
            self.transitions.append(Transition(
                incident.id, "resolved", at, SYSTEM, f"{state.passes} consecutive passed runs",
                incident.snapshot()))


def act(
    incident: Incident, action: Action, *, at: datetime, actor: str, comment: str | None
) -> tuple[Incident, Transition] | None:
    """A person's acknowledge / resolve / reopen: the incident after it and the transition, or
    None when the action does not apply to the incident's status. A reopen by hand is no new
    failure: ``last_failure_at`` stays."""
    sources, target, kind = TRANSITIONS[action]
    if incident.status not in sources:
        return None
    after = replace(incident, status=target)
    if target is IncidentStatus.ACKNOWLEDGED:
        after.acknowledged_at = at
    elif target is IncidentStatus.RESOLVED:
        after.resolved_at = at
    else:
        after.resolved_at = after.acknowledged_at = None
        after.episode_started_at = at
    return after, Transition(incident.id, kind, at, actor, comment, after.snapshot())
