"""``outcomewatch suggest --api URL``: the same report, asked of a running server."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx

from outcomewatch.durations import format_duration

TIMEOUT_S = 300.0  # a backtest over weeks of spans takes a while; a dead server fails at once


class SuggestClientError(Exception):
    """The server could not be asked, or refused: one line saying which and why."""


def fetch_suggestions(
    base_url: str, *, since: timedelta, trigger: str, min_traces: int, token: str | None = None
) -> dict[str, Any]:
    """GET ``{base_url}/api/v1/suggestions``; raises SuggestClientError."""
    url = base_url.rstrip("/") + "/api/v1/suggestions"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    params: dict[str, str | int] = {"since": format_duration(since), "trigger": trigger,
                                    "min_traces": min_traces}
    try:
        response = httpx.get(url, params=params, headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise SuggestClientError(f"cannot reach {url}: {exc}") from exc
    if response.status_code != 200:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise SuggestClientError(f"{url} answered {response.status_code}: {detail}")
    try:
        report: dict[str, Any] = response.json()
    except ValueError as exc:
        raise SuggestClientError(f"{url} answered something that is not JSON") from exc
    return report
