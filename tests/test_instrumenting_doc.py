"""docs/instrumenting.md: its Python blocks, extracted and run in order as written (the OTel SDK
and the official OTLP exporter), against a real server loaded with the example rules; the runs
of the rules the doc names must pass."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.harness import running_server

DOC = Path(__file__).resolve().parent.parent / "docs" / "instrumenting.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


class Entitlements:
    def downgrade(self, customer: str) -> str:
        return "read-only"


class Mailer:
    def send(self, customer: str, *, template: str) -> dict[str, str]:
        return {"id": "msg_123", "status": "delivered"}


def test_the_python_snippets_run_and_their_workflows_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) == 4
    with running_server(tmp_path) as server:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{server.grpc_endpoint}")
        namespace: dict[str, Any] = {"__name__": "instrumenting_doc"}
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)  # the doc, as a reader runs it
        namespace["handle_stripe_webhook"](
            {"id": "evt_1", "type": "invoice.payment_failed",
             "data": {"object": {"subscription": "sub_1", "customer": "cus_1"}}},
            Entitlements(), Mailer())
        queue: list[dict[str, Any]] = []
        namespace["handle_subscription_created"](
            {"type": "customer.subscription.created",
             "data": {"object": {"id": "sub_2", "customer": "cus_2"}}}, queue)
        namespace["run_provisioning_job"](queue.pop(), lambda subscription: "tenant_7")
        step = lambda backup_id: None  # noqa: E731
        namespace["nightly_backup"]("bk_1", step, step, step)
        provider = namespace["provider"]
        provider.force_flush()
        try:
            for rule in ("payment-failed-updates-access", "subscription-provisioned",
                         "backup-restore-proven"):
                def verdicts(rule: str = rule) -> list[dict[str, Any]]:
                    return [r for r in server.runs(rule=rule) if r["status"] != "open"]

                [run] = server.wait_for(verdicts, what=f"a verdict of {rule}")
                assert (rule, run["status"], run["missing"]) == (rule, "passed", [])
        finally:
            provider.shutdown()
