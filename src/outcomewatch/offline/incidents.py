"""The incidents a sequence of verdicts would open, kept in memory (no database).

The same lifecycle as ``store.incidents`` applies to verdicts, per rule and group (the canonical
JSON of the trigger's ``group_by`` values, as the server keys them):

- a failure adds to the consecutive-failure streak and resets the pass streak; it counts in the
  open incident of its group, else it re-opens an incident resolved within ``reopen_within``,
  else it opens a new one once ``open_after`` consecutive failures are reached; failures held
  back by ``open_after`` are attached to the incident when it opens;
- a pass adds to the pass streak and resets the failure streak; ``resolve_after`` consecutive
  passes resolve the open incident.

Acknowledgements are a person's act and have no place here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from outcomewatch.model import GroupValues, IncidentStatus, RunFailed, RunPassed
from outcomewatch.rules import RuleSet

DEFAULT_REOPEN_WINDOW = timedelta(hours=24)


def group_key(group: GroupValues) -> str:
    """As the server stores it: canonical JSON of the group values ('' for an ungrouped rule)."""
    return json.dumps(dict(group), sort_keys=True, default=str) if group else ""


@dataclass(slots=True)
class Incident:
    rule: str
    group: dict[str, Any]
    status: IncidentStatus
    opened_at: datetime
    failure_count: int = 0
    first_failure: datetime | None = None
    last_failure: datetime | None = None
    resolved_at: datetime | None = None
    run_ids: list[str] = field(default_factory=list)

    def attach(self, failures: list[RunFailed]) -> None:
        for failure in failures:
            self.failure_count += 1
            self.run_ids.append(failure.run_id)
            at = failure.closed_at
            self.first_failure = at if self.first_failure is None else min(self.first_failure, at)
            self.last_failure = at if self.last_failure is None else max(self.last_failure, at)


@dataclass(slots=True)
class _GroupState:
    failures: int = 0
    passes: int = 0
    held: list[RunFailed] = field(default_factory=list)  # failures not in any incident yet
    current: Incident | None = None  # open, or the latest resolved


class IncidentBook:
    def __init__(self, rules: RuleSet, *, reopen_window: timedelta = DEFAULT_REOPEN_WINDOW):
        self._rules = rules
        self._reopen_window = reopen_window
        self._groups: dict[tuple[str, str], _GroupState] = {}
        self.incidents: list[Incident] = []

    def _state(self, rule: str, group: GroupValues) -> _GroupState:
        key = (rule, group_key(group))
        state = self._groups.get(key)
        if state is None:
            state = self._groups[key] = _GroupState()
        return state

    def failed(self, failure: RunFailed) -> None:
        rule = self._rules.by_name(failure.rule)
        open_after = rule.open_after if rule is not None else 1
        reopen = (rule.reopen_within if rule is not None else None) or self._reopen_window
        state = self._state(failure.rule, failure.group)
        state.failures += 1
        state.passes = 0
        state.held.append(failure)
        incident = state.current
        if incident is None or incident.status is IncidentStatus.RESOLVED:
            if state.failures < open_after:
                return
            if (
                incident is not None
                and incident.resolved_at is not None
                and incident.resolved_at >= failure.closed_at - reopen
            ):
                incident.status, incident.resolved_at = IncidentStatus.OPEN, None
            else:
                incident = Incident(failure.rule, dict(failure.group), IncidentStatus.OPEN,
                                    opened_at=failure.closed_at)
                self.incidents.append(incident)
            state.current = incident
        incident.attach(state.held)
        state.held = []

    def passed(self, run: RunPassed) -> None:
        rule = self._rules.by_name(run.rule)
        state = self._state(run.rule, run.group)
        state.passes += 1
        state.failures = 0
        resolve_after = rule.resolve_after if rule is not None else None
        incident = state.current
        if (
            resolve_after is not None
            and state.passes >= resolve_after
            and incident is not None
            and incident.status is IncidentStatus.OPEN
        ):
            incident.status, incident.resolved_at = IncidentStatus.RESOLVED, run.closed_at
