"""The --config file: defaults, the documented example, and every kind of problem located at
file:line:column."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from outcomewatch.config import DEFAULT_EXTERNAL_URL, load_config
from outcomewatch.errors import RuleError
from outcomewatch.incidents.senders import render_template

EXAMPLE = """\
external_url: http://outcomewatch.internal:8080/
incidents:
  reopen_window: 12h
routes:
  billing-oncall:
    alertmanager: {url: http://alertmanager:9093}
    webhook:
      url: https://hooks.example/outcomes
      headers: {Authorization: "Bearer xyz"}
      template: '{"text": "{{ incident.summary }} {{ url }}"}'
      content_type: text/plain
      timeout: 2s
  data-oncall:
    webhook: {url: https://hooks.example/data}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "outcomewatch.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(RuleError) as caught:
        load_config(path)
    prefix = f"{path}:"
    assert all(str(p).startswith(prefix) for p in caught.value.problems)
    return [str(p)[len(prefix) :] for p in caught.value.problems]


def test_no_file_gives_the_defaults() -> None:
    config = load_config(None)
    assert config.external_url == DEFAULT_EXTERNAL_URL == "http://127.0.0.1:8080"
    assert config.reopen_window == timedelta(hours=24)
    assert dict(config.routes) == {}
    assert config.targets_for("billing-oncall") == ()


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing configured yet\n")) == load_config(None)


def test_the_documented_example_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, EXAMPLE))
    assert config.external_url == "http://outcomewatch.internal:8080"  # no trailing slash
    assert config.reopen_window == timedelta(hours=12)
    billing = config.routes["billing-oncall"]
    assert billing.alertmanager is not None and billing.webhook is not None
    assert billing.alertmanager.url == "http://alertmanager:9093"
    assert billing.alertmanager.timeout == timedelta(seconds=10)
    assert billing.webhook.url == "https://hooks.example/outcomes"
    assert dict(billing.webhook.headers) == {"Authorization": "Bearer xyz"}
    assert billing.webhook.content_type == "text/plain"
    assert billing.webhook.timeout == timedelta(seconds=2)
    assert billing.webhook.template is not None
    rendered = billing.webhook.template.render(incident={"summary": "s"}, url="u")
    assert rendered == '{"text": "s u"}'
    data = config.routes["data-oncall"].webhook
    assert data is not None and data.template is None and data.content_type == "application/json"


def test_targets_for_lists_targets_in_a_fixed_order(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, EXAMPLE))
    assert config.targets_for("billing-oncall") == ("alertmanager", "webhook")
    assert config.targets_for("data-oncall") == ("webhook",)
    assert config.targets_for("unknown-route") == ()


def test_unknown_keys_are_located_and_a_close_key_suggested(tmp_path: Path) -> None:
    text = "routes:\n  billing:\n    webhok:\n      url: http://x\nincident: {}\n"
    assert problems(tmp_path, text) == [
        "3:5: routes.billing: unknown key 'webhok': did you mean 'webhook'? "
        "(expected one of: alertmanager, webhook)",
        "5:1: unknown key 'incident': did you mean 'incidents'? "
        "(expected one of: external_url, incidents, routes)",
    ]


def test_wrong_values_are_located_at_the_value(tmp_path: Path) -> None:
    text = """\
external_url: outcomewatch.internal
incidents:
  reopen_window: 24 hours
routes:
  ops:
    webhook:
      url: https://hooks.example
      headers: {Authorization: Bearer, X-Retries: 5}
      timeout: soon
"""
    assert problems(tmp_path, text) == [
        "1:15: external_url: expected an http(s) URL, got 'outcomewatch.internal'",
        "3:18: incidents.reopen_window: invalid duration '24 hours': use a number with a unit, "
        "like 250ms, 30s, 10m, 1h30m, 7d",
        "8:51: routes.ops.webhook.headers.X-Retries: expected a string, got int 5",
        "9:16: routes.ops.webhook.timeout: invalid duration 'soon': use a number with a unit, "
        "like 250ms, 30s, 10m, 1h30m, 7d",
    ]


def test_a_broken_template_is_a_config_error(tmp_path: Path) -> None:
    text = """\
routes:
  ops:
    webhook:
      url: https://hooks.example
      template: |
        {"text": "{{ incident.summary }}",
         "url": "{{ url | nosuchfilter }}"}
  data:
    webhook:
      url: https://hooks.example
      template: '{"text": "{{ incident.summary "}'
"""
    found = problems(tmp_path, text)
    assert found[0] == (
        "5:17: routes.ops.webhook.template: invalid template: No filter named 'nosuchfilter'. "
        "(line 2 of the template)"
    )
    assert found[1].startswith("11:17: routes.data.webhook.template: invalid template: ")
    assert len(found) == 2


def test_missing_url_empty_route_and_duplicate_keys(tmp_path: Path) -> None:
    text = """\
routes:
  ops:
    alertmanager: {timeout: 5s}
  silent: {}
  twice:
    webhook: {url: http://a}
    webhook: {url: http://b}
"""
    assert problems(tmp_path, text) == [
        "3:5: routes.ops.alertmanager: 'url' is required",
        "4:3: routes.silent: a route needs at least one target: alertmanager, webhook",
        "7:5: routes.twice: duplicate key 'webhook' (first at line 6)",
    ]


def test_invalid_yaml_and_wrong_shapes(tmp_path: Path) -> None:
    assert problems(tmp_path, "routes:\n  ops: [\n") == [
        "2:1: invalid YAML: expected the node content, but found '<stream end>'"
    ]
    assert problems(tmp_path, "- a list\n") == [
        "1:1: expected a mapping (external_url, incidents, routes)"
    ]
    assert problems(tmp_path, "routes:\n  ops: http://x\n") == [
        "2:8: routes.ops: expected a mapping, got str 'http://x'"
    ]


def test_an_unreadable_file_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(RuleError) as caught:
        load_config(missing)
    (problem,) = caught.value.problems
    assert problem.file == str(missing) and problem.line == 1
    assert problem.message.startswith("cannot read config file:")


def test_the_shipped_example_config_loads_and_its_template_renders_valid_json() -> None:
    example = Path(__file__).resolve().parent.parent / "deploy" / "outcomewatch.yaml"
    config = load_config(example)
    assert config.targets_for("billing-oncall") == ("alertmanager",)
    template = config.routes["ml-platform-oncall"].webhook
    assert template is not None and template.template is not None
    body = render_template(template.template, {"summary": 'say "hi"'}, transition="opened",
                           url="http://x/1")
    assert json.loads(body) == {"text": '[opened] say "hi" http://x/1'}


BAD_RESEND = """\
routes:
  billing-oncall:
    alertmanager:
      url: http://alertmanager:9093
      resend_every: 5
  data-oncall:
    alertmanager: {url: http://alertmanager:9093, resend_every: sometimes}
"""


def test_resend_every_problems_are_said_in_the_files_own_terms(tmp_path: Path) -> None:
    assert problems(tmp_path, BAD_RESEND) == [
        "5:21: routes.billing-oncall.alertmanager.resend_every: expected a duration like 1m, "
        "or never",
        "7:65: routes.data-oncall.alertmanager.resend_every: invalid duration 'sometimes': use "
        "a number with a unit, like 250ms, 30s, 10m, 1h30m, 7d, or never",
    ]
    text = "routes:\n  r:\n    alertmanager: {url: http://a, resend_every: never}\n"
    never = write(tmp_path, text)
    am = load_config(never).routes["r"].alertmanager
    assert am is not None and am.resend_every is None


def test_serve_with_a_bad_config_prints_located_problems_and_no_internals(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: r\n    trigger: {span: a}\n    expect: [{span: b}]\n")
    config = write(tmp_path, BAD_RESEND)
    result = subprocess.run(
        [sys.executable, "-m", "outcomewatch", "serve", "--rules", str(rules), "--config",
         str(config), "--db", str(tmp_path / "ow.duckdb"), "--grpc", "127.0.0.1:0",
         "--http", "127.0.0.1:0", "--api", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines == [
        f"{config}:5:21: routes.billing-oncall.alertmanager.resend_every: expected a duration "
        "like 1m, or never",
        f"{config}:7:65: routes.data-oncall.alertmanager.resend_every: invalid duration "
        "'sometimes': use a number with a unit, like 250ms, 30s, 10m, 1h30m, 7d, or never",
        "outcomewatch: 2 error(s) in rule or config files",
    ]
    assert "function-before" not in result.stderr and "Traceback" not in result.stderr
