"""The incident file of one failed run, as far as the verdict knows it, and its summary line.

An on-call person should not have to search logs: the failure carries the error spans with their
status messages and exception events, the green signals that looked healthy, the rule's evidence
values, the resource attributes (service.version is the deploy, host.name the host) and the
trigger span itself (its attributes are the retry context: the external ids to replay the work).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from outcomewatch.durations import format_duration
from outcomewatch.incident_file import exceptions, span_summary
from outcomewatch.model import AttributeValue, RunFailed, search_keys
from outcomewatch.rules import Rule


def verdict_detail(rule: Rule, failure: RunFailed) -> dict[str, Any]:
    """What the verdict knows of a failed run in memory, stored with it (the ``detail`` column
    of incident_failures); incident_file.complete adds the rest from the stored trace when the
    incident file is read. Nothing here reads the trace: a failure costs the same whatever the
    size of its trace or of the table."""
    trigger = failure.trigger
    if trigger is None:  # a scheduled run that never started: there is no trace to show
        return {"error_spans": [], "green_signals": [], "evidence": {}, "resource": {},
                "trigger": {}, "scheduled_at": failure.opened_at.isoformat(),
                "duration_ms": None, "span_count": 0, "offending": []}
    evidence: dict[str, AttributeValue] = {}
    for key in rule.evidence:
        if key in trigger.attributes:
            evidence[key] = trigger.attributes[key]
    return {
        "offending": [
            {**span_summary(s), "trace_id": s.trace_id, "attributes": dict(s.attributes),
             "exceptions": exceptions(s)}
            for s in failure.offending
        ],
        "evidence": evidence,
        "evidence_keys": list(rule.evidence),
        "resource": dict(trigger.resource),
        "trigger": {
            **span_summary(trigger),
            "trace_id": trigger.trace_id,
            "start_ns": trigger.start_ns,
            "end_ns": trigger.end_ns,
            "attributes": dict(trigger.attributes),
        },
        # The spans that are evidence: those of the trace received up to the verdict.
        "received_until_ns": failure.last_received_ns,
    }


def evidence_keys(rule: Rule, failure: RunFailed) -> tuple[tuple[str, str], ...]:
    """The evidence values of the trigger, as search keys."""
    if failure.trigger is None:
        return ()
    return search_keys({k: failure.trigger.attributes[k] for k in rule.evidence
                        if k in failure.trigger.attributes})


_WHY = {
    "trace_idle": "did not happen before the trace went idle",
    "deadline": "did not happen within {within}",
    "forbidden": "was not reached: a forbidden step ({offending}) happened",
    "count": "happened more often than allowed ({offending})",
    "max_duration": "took longer than {max_duration}",
    "missed": "never started: no {trigger} within the grace period of its schedule",
    "evicted": "could not be confirmed: the trace was evicted from live state",
}


def _written(value: timedelta | None) -> str:
    return "?" if value is None else format_duration(value)


def failure_summary(rule: Rule, failure: RunFailed) -> str:
    """One line for lists and notifications."""
    missing = ", ".join(failure.missing) or "the outcome"
    why = _WHY.get(failure.reason.value, failure.reason.value).format(
        # As written in the rule file (10m), not as a timedelta prints (0:10:00).
        within=_written(rule.within), max_duration=_written(rule.max_duration),
        trigger=rule.trigger.span,
        offending=", ".join(s.name for s in failure.offending) or "?",
    )
    if failure.reason.value in ("missed", "max_duration", "forbidden", "count"):
        return f"{rule.name}: the run {why}"
    return f"{rule.name}: {missing} {why}"
