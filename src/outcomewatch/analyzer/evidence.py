"""The incident file of one failed run, built from the whole stored trace.

An on-call person should not have to search logs: the failure carries the error spans with their
status messages and exception events, the green signals that looked healthy, the rule's evidence
values, the resource attributes (service.version is the deploy, host.name the host) and the
trigger span itself (its attributes are the retry context: the external ids to replay the work).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from outcomewatch.durations import format_duration
from outcomewatch.model import AttributeValue, RunFailed, Span, SpanStatus, span_kind_name
from outcomewatch.rules import Rule

_MAX_ERROR_SPANS = 20
_MAX_GREEN_SIGNALS = 20


def _exceptions(span: Span) -> list[dict[str, Any]]:
    return [
        {
            "type": e.attributes.get("exception.type"),
            "message": e.attributes.get("exception.message"),
            "stacktrace": e.attributes.get("exception.stacktrace"),
        }
        for e in span.events
        if e.name == "exception"
    ]


def _is_green(span: Span) -> bool:
    """A span that looked healthy: status OK, or an HTTP 2xx answer."""
    if span.status is SpanStatus.OK:
        return True
    code = span.attributes.get("http.response.status_code", span.attributes.get("http.status_code"))
    return isinstance(code, int) and not isinstance(code, bool) and 200 <= code < 300


def _span_summary(span: Span) -> dict[str, Any]:
    return {
        "name": span.name,
        "service": span.service,
        "span_id": span.span_id,
        "kind": span_kind_name(span.kind),
        "status": span.status.value,
        "status_message": span.status_message,
        "duration_ms": max(span.end_ns - span.start_ns, 0) / 1e6,
    }


def evidence_values(rule: Rule, trigger: Span, spans: Sequence[Span]) -> dict[str, AttributeValue]:
    """The rule's evidence keys: from the trigger span, else any span of the trace, else the
    resource attributes. Keys found nowhere are left out rather than reported as null."""
    found: dict[str, AttributeValue] = {}
    for key in rule.evidence:
        if key in trigger.attributes:
            found[key] = trigger.attributes[key]
            continue
        for span in spans:
            if key in span.attributes:
                found[key] = span.attributes[key]
                break
        else:
            for span in [trigger, *spans]:
                if key in span.resource:
                    found[key] = span.resource[key]
                    break
    return found


def failure_detail(rule: Rule, failure: RunFailed, spans: Sequence[Span]) -> dict[str, Any]:
    """JSON-ready detail of one failed run (the ``detail`` column of incident_failures)."""
    trigger = failure.trigger
    if trigger is None:  # a scheduled run that never started: there is no trace to show
        return {"error_spans": [], "green_signals": [], "evidence": {}, "resource": {},
                "trigger": {}, "scheduled_at": failure.opened_at.isoformat(),
                "duration_ms": None, "span_count": 0, "offending": []}
    errors = [s for s in spans if s.status is SpanStatus.ERROR or any(
        e.name == "exception" for e in s.events)]
    green = [s for s in spans if _is_green(s)]
    resource: dict[str, AttributeValue] = {}
    for span in [trigger, *spans]:
        for key, value in span.resource.items():
            resource.setdefault(key, value)
    end = max((s.end_ns for s in spans), default=trigger.end_ns)
    return {
        "error_spans": [
            {**_span_summary(s), "exceptions": _exceptions(s)} for s in errors[:_MAX_ERROR_SPANS]
        ],
        "green_signals": [_span_summary(s) for s in green[:_MAX_GREEN_SIGNALS]],
        "offending": [
            {**_span_summary(s), "trace_id": s.trace_id, "attributes": dict(s.attributes),
             "exceptions": _exceptions(s)}
            for s in failure.offending
        ],
        "evidence": evidence_values(rule, trigger, spans),
        "resource": resource,
        "trigger": {
            **_span_summary(trigger),
            "trace_id": trigger.trace_id,
            "attributes": dict(trigger.attributes),
        },
        "duration_ms": max(end - trigger.start_ns, 0) / 1e6,
        "span_count": len(spans),
    }


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
