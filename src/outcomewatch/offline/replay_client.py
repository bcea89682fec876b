"""``outcomewatch replay --api URL``: the rule files as one document to a running server's
``POST /api/v1/replay``; the answer is the report as ``replay --format json`` prints it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import httpx
import yaml

from outcomewatch.durations import format_duration
from outcomewatch.rules import rule_files


class ReplayClientError(Exception):
    """The server could not be reached or refused the backtest; the message is one line."""


def backtest_remote(
    api: str, rule_paths: Sequence[str], *, since: timedelta | None, trace_idle: timedelta,
    token: str | None,
) -> dict[str, Any]:
    merged: list[object] = []
    for path in rule_files(list(rule_paths)):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        merged.extend(document.get("rules") or [])
    params = {"trace_idle": format_duration(trace_idle)}
    if since is not None:
        params["since"] = format_duration(since)
    headers = {"Content-Type": "application/yaml"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = api.rstrip("/") + "/api/v1/replay"
    try:
        answer = httpx.post(url, params=params, headers=headers, timeout=600,
                            content=yaml.safe_dump({"rules": merged}, sort_keys=False))
    except httpx.HTTPError as exc:
        raise ReplayClientError(f"cannot reach {url}: {exc}") from None
    if answer.status_code != 200:
        try:
            body = answer.json()
            detail = body.get("detail") or "; ".join(
                f"{p['file']}:{p['line']}:{p['column']}: {p['message']}"
                for p in body.get("problems", []))
        except (ValueError, KeyError, TypeError, AttributeError):
            detail = answer.text[:200]
        raise ReplayClientError(f"{url} answered {answer.status_code}: {detail}")
    report: dict[str, Any] = answer.json()
    return report
