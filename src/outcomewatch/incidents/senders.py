"""Senders: one incident transition (an outbox row's payload snapshot) -> one HTTP POST.

Two targets, both things teams already run for paging:

- Alertmanager's v2 API (``POST {url}/api/v2/alerts``), one alert per incident, identified (as
  Alertmanager identifies alerts) by its labels; a re-send posts all of a target's firing
  alerts in one request, as Prometheus does.
- A generic webhook whose default body is what Alertmanager itself posts to webhook receivers,
  so existing receivers (and their parsers) take it as is; or a Jinja2 template of the config.

A sender returns when the receiver answered 2xx and raises DeliveryError otherwise (saying
whether the target itself looks down, or only this notification was refused). It does no
retrying: the Notifier owns retries, backoff and ordering.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import httpx
import jinja2

from outcomewatch import jsonsafe
from outcomewatch.config import AlertmanagerTarget, WebhookTarget
from outcomewatch.errors import OutcomewatchError

ALERTNAME = "OutcomeMissing"
# Alertmanager resolves an alert with no endsAt after its resolve_timeout (5m by default) unless
# the client re-sends it, as Prometheus does every minute. We send a transition once, so a firing
# alert carries an explicit endsAt this far ahead: it stays firing until our "resolved" arrives.
FIRING_HORIZON = timedelta(days=365)
NOT_ENDED = "0001-01-01T00:00:00Z"  # what Alertmanager's webhook shows as endsAt while firing
ERROR_BODY_CHARS = 200
_NOT_GROUPING = ("alertname", "owner", "severity", "route")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# A group value that is missing (null) or empty still needs a label value of its own: an empty
# label value means "no label" to Alertmanager, and two incidents would share one identity.
MISSING_VALUE = "<missing>"
EMPTY_VALUE = "<empty>"
_FNV_OFFSET = 14695981039346656037
_FNV_PRIME = 1099511628211
_SEPARATOR = 0xFF  # prometheus/common model.SeparatorByte


class DeliveryError(OutcomewatchError):
    """A notification the receiver did not accept; the message is what ``last_error`` shows.

    ``target_down``: the target itself failed (no connection, timeout, 5xx, 429), so the
    Notifier backs off the whole target; otherwise only this notification was refused (another
    4xx, a template error) and the target's other notifications go on."""

    def __init__(self, message: str, *, target_down: bool = False) -> None:
        super().__init__(message)
        self.target_down = target_down


def incident_url(external_url: str, incident_id: int) -> str:
    return f"{external_url}/api/v1/incidents/{incident_id}"


def sanitize_label_name(name: str) -> str:
    """``name`` as a valid Prometheus label name: invalid characters become ``_``, and a name
    that starts with a digit (or is empty) gets a leading ``_``."""
    cleaned = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return cleaned if _LABEL_NAME.fullmatch(cleaned) else f"_{cleaned}"


def group_labels(payload: Mapping[str, Any]) -> dict[str, str]:
    """The incident's group_by values as labels: names sanitised (``customer.id`` becomes
    ``customer_id``), a null or missing value shown as ``<missing>`` and an empty string as
    ``<empty>`` (never left out: an empty label value means "no label" to Alertmanager, and
    two incidents would then share one alert identity), other non-strings JSON-encoded."""
    labels: dict[str, str] = {}
    group = payload.get("group") or {}
    for key, value in group.items() if isinstance(group, Mapping) else ():
        text = _label_value(value)
        if value is None:
            text = MISSING_VALUE
        elif not text:
            text = EMPTY_VALUE
        name = sanitize_label_name(str(key))
        while name in labels:  # two keys that sanitise alike ("a.b", "a_b") both stay
            name += "_"
        labels[name] = text
    return labels


def alert_labels(payload: Mapping[str, Any]) -> dict[str, str]:
    """alertname, rule, owner, severity, route, then the group labels.

    A group label never replaces one of the first five (it is renamed ``group_<name>``): they
    identify the alert, and Alertmanager matches a resolve to its alert by the full label set.
    """
    labels = {
        "alertname": ALERTNAME,
        "rule": _label_value(payload.get("rule")),
        "owner": _label_value(payload.get("owner")),
        "severity": _label_value(payload.get("severity")),
        "route": _label_value(payload.get("route")),
    }
    labels = {name: value for name, value in labels.items() if value}
    for name, value in group_labels(payload).items():
        while name in labels:
            name = f"group_{name}"
        labels[name] = value
    return labels


def alert_annotations(payload: Mapping[str, Any], url: str) -> dict[str, str]:
    annotations = {
        "summary": payload.get("summary"),
        "description": payload.get("description"),
        "incident_url": url,
    }
    return {name: str(value) for name, value in annotations.items() if value}


def episode_start(payload: Mapping[str, Any]) -> str | None:
    """When the incident's current firing episode began: its latest (re-)opening."""
    started = payload.get("episode_started_at") or payload.get("opened_at")
    return str(started) if started else None


def alertmanager_alert(
    payload: Mapping[str, Any], *, transition: str, external_url: str, now: datetime,
    horizon: timedelta = FIRING_HORIZON,
) -> dict[str, Any]:
    """The postableAlert for ``transition``: resolved ends at the incident's resolved_at (or
    ``now`` if the snapshot lacks it), anything else at ``now + horizon``."""
    url = incident_url(external_url, int(payload["id"]))
    alert: dict[str, Any] = {
        "labels": alert_labels(payload),
        "annotations": alert_annotations(payload, url),
        "generatorURL": url,
    }
    started = episode_start(payload)
    if started:
        alert["startsAt"] = started
    if transition == "resolved":
        alert["endsAt"] = payload.get("resolved_at") or now.isoformat()
    else:
        alert["endsAt"] = (now + horizon).isoformat()
    return alert


def firing_horizon(target: AlertmanagerTarget) -> timedelta:
    """How long a firing alert lasts in Alertmanager unless posted again (see resend_every)."""
    return FIRING_HORIZON if target.resend_every is None else 4 * target.resend_every


async def send_alertmanager(
    client: httpx.AsyncClient,
    target: AlertmanagerTarget,
    payload: Mapping[str, Any],
    *,
    transition: str,
    external_url: str,
    now: datetime,
) -> bool:
    """Post the incident's alert; True if a request was made.

    An "acknowledged" transition makes no request and returns False: Alertmanager has no notion
    of acknowledging an alert (a silence is its nearest, and would hide a reopen), and re-posting
    the same firing alert would change nothing. The caller counts it as delivered.
    """
    if transition == "acknowledged":
        return False
    alert = alertmanager_alert(payload, transition=transition, external_url=external_url,
                               now=now, horizon=firing_horizon(target))
    await post_alerts(client, target, [alert])
    return True


async def post_alerts(
    client: httpx.AsyncClient, target: AlertmanagerTarget, alerts: list[dict[str, Any]]
) -> None:
    """Post ``alerts`` (postableAlerts) to the target in one request."""
    await _post(
        client,
        f"{target.url}/api/v2/alerts",
        content=_json(alerts),
        headers={"Content-Type": "application/json"},
        timeout=target.timeout,
    )


def webhook_body(
    payload: Mapping[str, Any], *, transition: str, route: str, external_url: str
) -> dict[str, Any]:
    """An Alertmanager webhook message (version 4) for the incident, plus ``outcomewatch``: the
    full snapshot (transition, comment, actor) that the Alertmanager format has no place for."""
    url = incident_url(external_url, int(payload["id"]))
    status = "resolved" if transition == "resolved" else "firing"
    labels = alert_labels(payload)
    annotations = alert_annotations(payload, url)
    ends_at = (payload.get("resolved_at") or NOT_ENDED) if status == "resolved" else NOT_ENDED
    return {
        "version": "4",
        "groupKey": f"outcomewatch:{payload['id']}",
        "truncatedAlerts": 0,
        "status": status,
        "receiver": route,
        # An incident groups the failures of one rule by its group_by values.
        "groupLabels": {k: v for k, v in labels.items() if k not in _NOT_GROUPING},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": external_url,
        "alerts": [
            {
                "status": status,
                "labels": labels,
                "annotations": annotations,
                "startsAt": episode_start(payload) or NOT_ENDED,
                "endsAt": ends_at,
                "generatorURL": url,
                "fingerprint": fingerprint(labels),
            }
        ],
        "outcomewatch": dict(payload),
    }


def fingerprint(labels: Mapping[str, str]) -> str:
    """The label set's fingerprint exactly as Alertmanager computes it (prometheus/common
    ``LabelSet.Fingerprint``): FNV-1a 64 over the label names in sorted order, each name and
    its value followed by the separator byte 0xFF, as 16 lowercase hex digits.

    Written out because no maintained Python package exposes it; 8 lines, pinned by a test
    against a real Alertmanager's ``/api/v2/alerts``."""
    digest = _FNV_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in (*part.encode(), _SEPARATOR):
                digest = ((digest ^ byte) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{digest:016x}"


def render_template(
    template: jinja2.Template, payload: Mapping[str, Any], *, transition: str, url: str
) -> str:
    """The template rendered with ``incident`` (the snapshot), ``transition`` and ``url``."""
    try:
        return template.render(incident=dict(payload), transition=transition, url=url)
    except Exception as exc:  # a template can raise anything (TypeError, SecurityError, ...)
        raise DeliveryError(f"template error: {type(exc).__name__}: {exc}") from exc


async def send_webhook(
    client: httpx.AsyncClient,
    target: WebhookTarget,
    payload: Mapping[str, Any],
    *,
    transition: str,
    route: str,
    external_url: str,
) -> None:
    """Post the webhook body (the template's output if the target has one) with its headers."""
    if target.template is not None:
        url = incident_url(external_url, int(payload["id"]))
        content = render_template(target.template, payload, transition=transition, url=url)
        body = content.encode()
    else:
        message = webhook_body(
            payload, transition=transition, route=route, external_url=external_url
        )
        body = _json(message)
    headers = httpx.Headers({"Content-Type": target.content_type})
    headers.update(dict(target.headers))  # the config may override Content-Type too
    await _post(client, target.url, content=body, headers=headers, timeout=target.timeout)


async def _post(
    client: httpx.AsyncClient,
    url: str,
    *,
    content: bytes,
    headers: httpx.Headers | Mapping[str, str],
    timeout: timedelta,
) -> None:
    # The URL is left out of error texts: a webhook URL often embeds its secret (Slack, Teams),
    # and the error is stored and shown by the API. The row already says which target it was.
    try:
        response = await client.post(
            url, content=content, headers=headers, timeout=timeout.total_seconds()
        )
    except httpx.HTTPError as exc:
        detail = str(exc) or "no detail"
        raise DeliveryError(f"{type(exc).__name__}: {detail}", target_down=True) from exc
    if not response.is_success:
        status, text = f"HTTP {response.status_code}", response.text[:ERROR_BODY_CHARS]
        down = response.status_code >= 500 or response.status_code == 429
        raise DeliveryError(f"{status}: {text}" if text else status, target_down=down)


def _json(value: Any) -> bytes:
    return jsonsafe.dumps(value).encode()


def _label_value(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else jsonsafe.dumps(value)
