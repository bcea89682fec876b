"""The rules page shows a rejected reload's problems, located, while the old rules run on."""

from __future__ import annotations

from pathlib import Path

from tests.harness import running_server

RULES = """
rules:
  - name: order-confirmed
    owner: shop
    trigger: {span: order.placed}
    expect: [{span: email.sent}]
"""


def test_a_rejected_reload_is_shown_on_the_rules_page(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    with running_server(tmp_path, rules=[rules]) as server:
        assert "The last reload was rejected" not in server.api.get("/rules").text
        rules.write_text(RULES.replace("within", "x").replace("owner: shop", "owner: shop\n"
                                                                             "    within: 600"))
        assert server.api.post("/api/v1/rules/reload").status_code == 422
        page = server.api.get("/rules").text
    assert "The last reload was rejected" in page
    assert "rules.yaml:" in page and "a bare number is not a duration" in page
    assert "order-confirmed" in page  # the old rules run on
