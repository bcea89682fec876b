"""What the console's templates are handed: a trace laid out as a waterfall, and small
formatting helpers (registered as Jinja2 filters). Pure functions of their input."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from outcomewatch.api.schemas_trace import SpanOut

SCALE = 1000  # bar positions are in thousandths of the trace's time span (SVG user units)
MAX_DEPTH = 12  # deeper spans are drawn at this indentation (their parent is still above)


@dataclass(frozen=True, slots=True)
class Row:
    """One waterfall row: a stored span, or (``span`` None) a missing outcome's placeholder."""

    span: SpanOut | None
    name: str
    depth: int
    left: int  # 0..SCALE
    width: int  # 1..SCALE
    is_trigger: bool = False


def waterfall(spans: Sequence[SpanOut], *, missing: Iterable[str] = (),
              trigger_span_id: str | None = None) -> list[Row]:
    """The spans as a tree (children under their parent, siblings by start time; a span whose
    parent is not stored is a root), then one placeholder row per ``missing`` outcome, drawn
    after the last span ends: where it was expected and never arrived."""
    if not spans and not missing:
        return []
    start = min((s.start_ns for s in spans), default=0)
    end = max((s.end_ns for s in spans), default=start)
    missing = list(missing)
    # Leave room on the right for the placeholders, so they are visibly "after everything".
    total = max(end - start, 1)
    full = total + (total // 5 if missing else 0)

    def position(begin_ns: int, end_ns: int) -> tuple[int, int]:
        left = int((begin_ns - start) * SCALE / full)
        width = max(int((end_ns - begin_ns) * SCALE / full), 2)
        left = min(max(left, 0), SCALE - 2)
        return left, min(width, SCALE - left)

    ids = {s.span_id for s in spans}
    children: dict[str, list[SpanOut]] = {}
    roots: list[SpanOut] = []
    for span in spans:
        if span.parent_span_id and span.parent_span_id in ids and span.parent_span_id != \
                span.span_id:
            children.setdefault(span.parent_span_id, []).append(span)
        else:
            roots.append(span)
    rows: list[Row] = []
    seen: set[str] = set()
    stack: list[tuple[SpanOut, int]] = [(s, 0) for s in sorted(roots, key=_order, reverse=True)]
    while stack:
        span, depth = stack.pop()
        if span.span_id in seen:  # a parent cycle in the input: draw each span once
            continue
        seen.add(span.span_id)
        left, width = position(span.start_ns, span.end_ns)
        rows.append(Row(span, span.name, min(depth, MAX_DEPTH), left, width,
                        span.span_id == trigger_span_id))
        for child in sorted(children.get(span.span_id, []), key=_order, reverse=True):
            stack.append((child, depth + 1))
    for span in spans:  # spans only reachable through a cycle
        if span.span_id not in seen:
            left, width = position(span.start_ns, span.end_ns)
            rows.append(Row(span, span.name, 0, left, width))
    placeholder_left = position(end, end)[0]
    for name in missing:
        rows.append(Row(None, name, 1, placeholder_left, SCALE - placeholder_left))
    return rows


def _order(span: SpanOut) -> tuple[int, str]:
    return span.start_ns, span.span_id


def duration(ms: float | None) -> str:
    """``1.2 s``, ``340 ms``, ``4 min 5 s``; an em dash for None."""
    if ms is None:
        return "—"
    if ms < 0.001:
        return "0 ms"
    if ms < 1:
        return f"{ms * 1000:.0f} µs"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def iso(moment: datetime | None) -> str:
    """Machine time for ``<time datetime>`` (the browser renders "3 min ago" from it)."""
    return "" if moment is None else moment.isoformat().replace("+00:00", "Z")


def clock(moment: datetime | None) -> str:
    """Human time without JavaScript: ``2026-12-01 21:05:45 UTC``."""
    return "—" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def value(item: object) -> str:
    """An attribute value as text: strings as they are, everything else as JSON."""
    if isinstance(item, str):
        return item
    return json.dumps(item, ensure_ascii=False, default=str)


def group_text(group: Mapping[str, object]) -> str:
    return ", ".join(f"{key}={value(item)}" for key, item in group.items())
