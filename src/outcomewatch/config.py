"""The server's config file (``--config FILE``, YAML): incident links, reopen window, routes.

Loaded once at startup by :func:`load_config`. Every problem is reported at once as
``file:line:column: field.path: message`` in a :class:`~outcomewatch.errors.RuleError` (the one
exception that carries located problems), using the rule loader's YAML helpers to locate them.

Webhook templates are compiled here, in the sandboxed environment the senders render with, so a
broken template stops the server at startup instead of failing every notification later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any
from urllib.parse import urlsplit

import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from outcomewatch import jsonsafe
from outcomewatch.durations import parse_duration
from outcomewatch.errors import DurationError, Problem, RuleError
from outcomewatch.rules.problems import at, duplicate_keys, locate, path, suggest

DEFAULT_EXTERNAL_URL = "http://127.0.0.1:8080"
DEFAULT_REOPEN_WINDOW = timedelta(hours=24)
DEFAULT_TIMEOUT = timedelta(seconds=10)
DEFAULT_RESEND = timedelta(minutes=1)
TARGETS = ("alertmanager", "webhook")  # the order targets_for reports them in


# --- what the rest of outcomewatch sees -------------------------------------------------------


@dataclass(frozen=True)
class AlertmanagerTarget:
    url: str  # base URL without a trailing slash; alerts go to {url}/api/v2/alerts
    timeout: timedelta = DEFAULT_TIMEOUT
    # Firing alerts are posted again this often with endsAt = now + 4 x resend_every, as
    # Prometheus does: an Alertmanager restart forgets nothing for long, and if outcomewatch
    # stops, its alerts end on their own instead of firing for ever. None: post each transition
    # once, with a far endsAt.
    resend_every: timedelta | None = DEFAULT_RESEND


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    template: jinja2.Template | None = None  # None: the Alertmanager-webhook-compatible body
    content_type: str = "application/json"
    timeout: timedelta = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class RouteConfig:
    alertmanager: AlertmanagerTarget | None = None
    webhook: WebhookTarget | None = None


@dataclass(frozen=True)
class NotifyConfig:
    external_url: str = DEFAULT_EXTERNAL_URL  # without a trailing slash
    reopen_window: timedelta = DEFAULT_REOPEN_WINDOW
    routes: Mapping[str, RouteConfig] = field(default_factory=dict)

    def targets_for(self, route: str) -> tuple[str, ...]:
        """The targets of ``route``, in the order of TARGETS; () if the route is not configured."""
        config = self.routes.get(route)
        if config is None:
            return ()
        return tuple(name for name in TARGETS if getattr(config, name) is not None)


def template_environment() -> SandboxedEnvironment:
    """The environment webhook templates are compiled (and so rendered) in.

    Sandboxed because the template comes from a file that may be less trusted than the server;
    autoescape off because bodies are JSON or text, not HTML. ``tojson`` is replaced: Jinja's own
    escapes ``<>&'`` for HTML, which would show up verbatim in a text/plain body.
    """
    env = SandboxedEnvironment(autoescape=False)
    env.filters["tojson"] = _tojson
    return env


def _tojson(value: Any) -> str:
    return jsonsafe.dumps(value)


_TEMPLATES = template_environment()


# --- the file as written ----------------------------------------------------------------------


def _duration(value: Any) -> timedelta:
    if not isinstance(value, str):
        raise PydanticCustomError("duration", "expected a duration like 30s or 24h")
    try:
        return parse_duration(value)
    except DurationError as exc:
        raise PydanticCustomError("duration", str(exc)) from None


def _url(value: Any) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError("url", "expected an http(s) URL")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        message = "expected an http(s) URL, got {value}"
        raise PydanticCustomError("url", message, {"value": repr(value)})
    # Paths are appended to it (/api/v2/alerts, /api/v1/incidents/1): no doubled slash.
    return value.strip().rstrip("/")


def _template(value: Any) -> jinja2.Template | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PydanticCustomError("template", "expected a template string")
    try:
        return _TEMPLATES.from_string(value)
    except jinja2.TemplateSyntaxError as exc:
        raise PydanticCustomError(
            "template",
            "invalid template: {message} (line {line} of the template)",
            {"message": exc.message or "syntax error", "line": exc.lineno},
        ) from None


def _resend(value: Any) -> timedelta | None:
    # One validator rather than a ``Duration | Literal["never"]`` union: pydantic reports a
    # union's failure once per member, under its internal names ("function-before[...]").
    if value == "never":
        return None
    if not isinstance(value, str):
        raise PydanticCustomError("duration", "expected a duration like 1m, or never")
    try:
        return parse_duration(value)
    except DurationError as exc:
        raise PydanticCustomError("duration", "{message}, or never", {"message": str(exc)}) \
            from None


Duration = Annotated[timedelta, BeforeValidator(_duration)]
Resend = Annotated[timedelta | None, BeforeValidator(_resend)]
Url = Annotated[str, BeforeValidator(_url)]
Template = Annotated[Any, BeforeValidator(_template)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AlertmanagerModel(_Model):
    url: Url
    timeout: Duration = DEFAULT_TIMEOUT
    resend_every: Resend = DEFAULT_RESEND


class WebhookModel(_Model):
    url: Url
    headers: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    template: Template = None
    content_type: StrictStr = "application/json"
    timeout: Duration = DEFAULT_TIMEOUT


class RouteModel(_Model):
    alertmanager: AlertmanagerModel | None = None
    webhook: WebhookModel | None = None

    @model_validator(mode="after")
    def _has_a_target(self) -> RouteModel:
        # A route without targets is almost surely a mistake; its incidents would go unannounced.
        if self.alertmanager is None and self.webhook is None:
            raise PydanticCustomError(
                "no_target", "a route needs at least one target: alertmanager, webhook"
            )
        return self


class IncidentsModel(_Model):
    reopen_window: Duration = DEFAULT_REOPEN_WINDOW


class ConfigFileModel(_Model):
    external_url: Url = DEFAULT_EXTERNAL_URL
    incidents: IncidentsModel = Field(default_factory=IncidentsModel)
    routes: dict[StrictStr, RouteModel] = Field(default_factory=dict)


# Allowed keys per mapping, for "unknown key" messages: the loc of a route's mapping is
# ("routes", <name>), hence the wildcard.
_KEYS: dict[tuple[str, ...], type[_Model]] = {
    (): ConfigFileModel,
    ("incidents",): IncidentsModel,
    ("routes", "*"): RouteModel,
    ("routes", "*", "alertmanager"): AlertmanagerModel,
    ("routes", "*", "webhook"): WebhookModel,
}


# --- loading ----------------------------------------------------------------------------------


def load_config(path: str | Path | None) -> NotifyConfig:
    """The config in ``path``; None (no ``--config``) or an empty file gives the defaults.

    Raises RuleError listing every problem (unreadable file, invalid YAML, duplicate or unknown
    keys, wrong types, bad durations, URLs and templates), each located at its file:line:column.
    """
    if path is None:
        return NotifyConfig()
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError([Problem(source, 1, f"cannot read config file: {exc}")]) from exc
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = f"invalid YAML: {exc.problem or exc.context or 'syntax error'}"
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        last_line = max(1, len(text.splitlines()))
        if line > last_line:  # "at the end of the stream" is past the final newline
            line, column = last_line, 1
        raise RuleError([Problem(source, line, message, column)]) from exc
    except yaml.YAMLError as exc:
        raise RuleError([Problem(source, 1, f"invalid YAML: {exc}")]) from exc
    finally:
        loader.dispose()
    if root is None or data is None:
        return NotifyConfig()
    if not isinstance(data, dict):
        message = "expected a mapping (external_url, incidents, routes)"
        raise RuleError([Problem(source, 1, message)])

    problems = duplicate_keys(source, root)
    try:
        model = ConfigFileModel.model_validate(data)
    except ValidationError as exc:
        problems += [_problem(source, root, data, error) for error in exc.errors()]
    if problems:
        raise RuleError(sorted(problems, key=lambda p: (p.line, p.column)))
    return _compile(model)


def _compile(model: ConfigFileModel) -> NotifyConfig:
    routes = {name: _compile_route(route) for name, route in model.routes.items()}
    return NotifyConfig(
        external_url=model.external_url,
        reopen_window=model.incidents.reopen_window,
        routes=MappingProxyType(routes),
    )


def _compile_route(model: RouteModel) -> RouteConfig:
    am, hook = model.alertmanager, model.webhook
    webhook = None
    if hook is not None:
        headers = MappingProxyType(dict(hook.headers))
        webhook = WebhookTarget(hook.url, headers, hook.template, hook.content_type, hook.timeout)
    alertmanager = None
    if am is not None:
        alertmanager = AlertmanagerTarget(am.url, am.timeout, am.resend_every)
    return RouteConfig(alertmanager=alertmanager, webhook=webhook)


def _problem(source: str, root: yaml.Node, data: Any, error: ErrorDetails) -> Problem:
    loc = tuple(part for part in error["loc"] if part != "[key]")
    kind = error["type"]
    if kind == "missing":
        line, column = locate(root, data, loc)
        message = at(path(loc[:-1], data), f"{loc[-1]!r} is required")
    elif kind == "extra_forbidden":
        line, column = locate(root, data, loc)
        message = at(path(loc[:-1], data), _unknown_key(str(loc[-1]), loc[:-1]))
    else:
        line, column = locate(root, data, loc, value=True)
        message = at(path(loc, data), _message(error))
    return Problem(source, line, message, column)


def _unknown_key(key: str, parent: tuple[str | int, ...]) -> str:
    # A route's name is data, not a key of the schema.
    pattern = tuple(
        "*" if i == 1 and parent[0] == "routes" else str(p) for i, p in enumerate(parent)
    )
    model = _KEYS.get(pattern)
    if model is None:
        return f"unknown key {key!r}"
    allowed = list(model.model_fields)
    suggestion = suggest(key, allowed)
    hint = f": did you mean {suggestion!r}?" if suggestion else ""
    return f"unknown key {key!r}{hint} (expected one of: {', '.join(allowed)})"


_EXPECTED = {
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _message(error: ErrorDetails) -> str:
    expected = _EXPECTED.get(error["type"])
    if expected is None:
        return error["msg"]
    given = error["input"]
    shown = "null" if given is None else f"{type(given).__name__} {given!r}"
    if isinstance(given, dict | list):
        shown = "a mapping" if isinstance(given, dict) else "a list"
    return f"expected {expected}, got {shown}"


__all__ = ["TARGETS", "AlertmanagerTarget", "NotifyConfig", "RouteConfig", "WebhookTarget",
           "load_config", "template_environment"]
