"""The incident file of a failed run: the span evidence, built when it is read, from the
stored trace. A leaf (model only): the analyzer summarises spans with it at verdict time, the
store completes the file with it at read time.

At verdict time the pipeline stores only what it knows in memory (the trigger and its
attributes, the offending spans, the evidence values found on the trigger, the receive window;
see analyzer/evidence.py ``verdict_detail``), so a failure costs nothing that grows with the
trace or the table, and no failure is ever left without evidence by a crash. The rest is derived
here from the trace's spans received up to the verdict (spans of failed traces are kept for
``--evidence-retention``): the error spans with their messages, exception events and attributes
(bounded), the green signals that looked healthy, the resource attributes, the evidence values
found on other spans, the duration and the span count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from outcomewatch.model import AttributeValue, Span, SpanStatus, span_kind_name

MAX_ERROR_SPANS = 20
MAX_GREEN_SIGNALS = 20
MAX_ATTRIBUTES = 32  # per error span
MAX_VALUE_CHARS = 2048  # a string attribute value (a response body) is cut past this


def exceptions(span: Span) -> list[dict[str, Any]]:
    return [
        {
            "type": e.attributes.get("exception.type"),
            "message": e.attributes.get("exception.message"),
            "stacktrace": e.attributes.get("exception.stacktrace"),
        }
        for e in span.events
        if e.name == "exception"
    ]


def is_green(span: Span) -> bool:
    """A span that looked healthy: status OK, or an HTTP 2xx answer."""
    if span.status is SpanStatus.OK:
        return True
    code = span.attributes.get("http.response.status_code", span.attributes.get("http.status_code"))
    return isinstance(code, int) and not isinstance(code, bool) and 200 <= code < 300


def span_summary(span: Span) -> dict[str, Any]:
    return {
        "name": span.name,
        "service": span.service,
        "span_id": span.span_id,
        "kind": span_kind_name(span.kind),
        "status": span.status.value,
        "status_message": span.status_message,
        "duration_ms": max(span.end_ns - span.start_ns, 0) / 1e6,
    }


def bounded(attributes: Mapping[str, AttributeValue]) -> dict[str, AttributeValue]:
    """At most MAX_ATTRIBUTES attributes, long strings cut (with a marker of what was cut)."""
    kept: dict[str, AttributeValue] = {}
    for key, value in list(attributes.items())[:MAX_ATTRIBUTES]:
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            value = f"{value[:MAX_VALUE_CHARS]}… ({len(value) - MAX_VALUE_CHARS} more characters)"
        kept[key] = value
    return kept


def complete(detail: Mapping[str, Any], spans: Sequence[Span]) -> dict[str, Any]:
    """The stored verdict ``detail`` with the evidence derived from the trace's ``spans``."""
    full = dict(detail)
    if not detail.get("trigger"):  # a scheduled run that never started: no trace to show
        return full
    errors = [s for s in spans if s.status is SpanStatus.ERROR or any(
        e.name == "exception" for e in s.events)]
    full["error_spans"] = [
        {**span_summary(s), "exceptions": exceptions(s), "attributes": bounded(s.attributes)}
        for s in errors[:MAX_ERROR_SPANS]
    ]
    full["green_signals"] = [span_summary(s) for s in spans if is_green(s)][:MAX_GREEN_SIGNALS]
    resource: dict[str, Any] = dict(detail.get("resource") or {})
    for span in spans:
        for key, value in span.resource.items():
            resource.setdefault(key, value)
    full["resource"] = resource
    evidence: dict[str, Any] = dict(detail.get("evidence") or {})
    for key in detail.get("evidence_keys") or ():
        if key in evidence:
            continue
        for span in spans:
            if key in span.attributes:
                evidence[key] = span.attributes[key]
                break
        else:
            for span in spans:
                if key in span.resource:
                    evidence[key] = span.resource[key]
                    break
    full["evidence"] = evidence
    trigger = detail["trigger"]
    start = trigger.get("start_ns")
    if isinstance(start, int) and spans:
        end = max(max(s.end_ns for s in spans), int(trigger.get("end_ns") or 0))
        full["duration_ms"] = max(end - start, 0) / 1e6
    full["span_count"] = len(spans)
    return full
