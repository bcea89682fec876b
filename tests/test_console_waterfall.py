"""The waterfall layout (api/console/view.py), a pure function: rendered as indented text."""

from __future__ import annotations

from collections.abc import Iterable

from outcomewatch.api.console.view import SCALE, Row, duration, waterfall
from outcomewatch.api.schemas_trace import SpanOut
from outcomewatch.model import Span, SpanStatus

TRACE = "ab" * 16


def span(span_id: str, parent: str, name: str, start_ms: int, end_ms: int) -> SpanOut:
    return SpanOut.from_span(Span(
        trace_id=TRACE, span_id=span_id * 16, parent_span_id=parent * 16 if parent else "",
        name=name, service="svc", kind=1, start_ns=start_ms * 1_000_000,
        end_ns=end_ms * 1_000_000, status=SpanStatus.OK, status_message=""))


def render(rows: Iterable[Row]) -> str:
    return "".join(f"{'  ' * r.depth}{r.name}{'' if r.span else ' (missing)'}\n" for r in rows)


def test_children_sit_under_their_parent_in_start_order_and_missing_outcomes_come_last():
    spans = [span("c", "a", "email.send", 50, 60), span("a", "", "webhook", 0, 100),
             span("b", "a", "entitlement.update", 10, 20), span("d", "z", "orphan", 70, 80)]

    rows = waterfall(spans, missing=["email.delivered"], trigger_span_id="a" * 16)
    assert render(rows) == (
        "webhook\n  entitlement.update\n  email.send\norphan\n  email.delivered (missing)\n")
    assert rows[0].is_trigger and rows[0].left == 0
    placeholder = rows[-1]
    assert placeholder.left >= max(r.left + r.width for r in rows[:-1]) - 1
    assert placeholder.left + placeholder.width == SCALE


def test_bars_are_proportional_to_time_and_never_vanish():
    rows = waterfall([span("a", "", "root", 0, 1000), span("b", "a", "blip", 500, 500)])
    assert (rows[0].left, rows[0].width) == (0, SCALE)
    assert (rows[1].left, rows[1].width) == (SCALE // 2, 2)


def test_a_parent_cycle_draws_each_span_once():
    rows = waterfall([span("a", "b", "one", 0, 10), span("b", "a", "two", 5, 10)])
    assert sorted(r.name for r in rows) == ["one", "two"]


def test_durations_read_as_a_person_would_say_them():
    assert [duration(x) for x in (None, 0, 0.12, 340, 1200, 125_000, 7_500_000)] == [
        "—", "0 ms", "120 µs", "340 ms", "1.2 s", "2 min 5 s", "2 h 5 min"]
