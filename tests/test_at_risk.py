"""Runs at risk: a span that matches an expectation's span and service but not its other
conditions is reported on the open run at once (``at_risk``), and the run shows when it is due
(``due_at``: its deadline, or when its trace goes idle). Through the real server."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode

from tests.harness import running_server, trace_id_of

RULES = """
rules:
  - name: order-confirmed
    owner: shop
    trigger: {span: order.placed}
    expect: [{span: email.sent, status: ok}]
"""


def test_an_error_on_the_expected_path_puts_the_open_run_at_risk(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    with running_server(tmp_path, rules=[rules]) as server:
        tracer = server.tracer("grpc", **{"service.name": "shop"})
        with (tracer.start_as_current_span("order.placed") as root,
              tracer.start_as_current_span("email.sent") as mail):  # the child is exported first
            mail.set_status(Status(StatusCode.ERROR, "413 message too large"))
        trace_id = trace_id_of(root)

        def at_risk() -> list[dict[str, str]] | None:
            runs = server.runs(trace_id=trace_id)
            return runs[0]["at_risk"] if runs and runs[0]["at_risk"] else None

        [risk] = server.wait_for(at_risk, what="the run at risk")
        assert risk == {"name": "email.sent", "status_message": "413 message too large"}
        [run] = server.runs(trace_id=trace_id)
        assert run["status"] == "open" and run["due_at"] is not None

        # While it waits, another failed attempt is reported too; the run still waits.
        with tracer.start_as_current_span("email.sent",
                                          context=_context_of(root)) as retry:
            retry.set_status(Status(StatusCode.ERROR, "421 try again later"))
        server.wait_for(lambda: len(server.runs(trace_id=trace_id)[0]["at_risk"]) == 2,
                        what="the second near miss")
        server.go_idle()
        failed = server.verdict(trace_id, "order-confirmed")
        assert failed["status"] == "failed" and failed["missing"] == ["email.sent"]
        assert [r["id"] for r in server.runs(reason="trace_idle")] == [failed["id"]]
        assert server.runs(reason="deadline") == []


def test_a_run_with_a_deadline_is_due_at_it(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("    owner: shop\n", "    owner: shop\n    within: 10m\n"))
    with running_server(tmp_path, rules=[rules]) as server:
        tracer = server.tracer("grpc", **{"service.name": "shop"})
        with tracer.start_as_current_span("order.placed") as root:
            pass
        trace_id = trace_id_of(root)
        [run] = server.wait_for(lambda: server.runs(trace_id=trace_id), what="the run")
        assert run["due_at"] is not None and run["at_risk"] == []


def _context_of(span: Span) -> Context:
    from opentelemetry import trace

    return trace.set_span_in_context(span)
