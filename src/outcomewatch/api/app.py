"""The FastAPI application factory. Nothing is created at import time: the caller owns the
Reader (and its duckdb connection), the incident actions and the metrics, and passes them in."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outcomewatch import __version__
from outcomewatch.api import console
from outcomewatch.api.auth import AUTH_RESPONSES, Tokens, require_read, require_write
from outcomewatch.api.deps import IncidentActions
from outcomewatch.api.routes import actions as actions_routes
from outcomewatch.api.routes import backtest as backtest_routes
from outcomewatch.api.routes import health, v1
from outcomewatch.api.routes import metrics as metrics_routes
from outcomewatch.api.routes import rules as rules_routes
from outcomewatch.api.routes import search as search_routes
from outcomewatch.api.routes import suggest as suggest_routes
from outcomewatch.api.routes.backtest import Backtest
from outcomewatch.api.routes.rules import RulesAdmin
from outcomewatch.api.routes.suggest import Suggester
from outcomewatch.api.schemas import ErrorOut
from outcomewatch.errors import StoreError
from outcomewatch.store.queries import Reader
from outcomewatch.store.rows import InvalidCursor

DESCRIPTION = """\
outcomewatch's API: the runs of outcome rules over traces, the incidents opened when runs
fail (acknowledge, resolve and reopen them), the notifications sent about them, and the stored
spans of any trace.

Authentication, when configured, is `Authorization: Bearer <token>`: the api token for writes
(POST), the read token or the api token for reads under /api/v1 and /metrics. Missing token:
401; wrong token: 403. /healthz, /readyz and the docs are always open.

Listings are newest first and paginated by keyset: pass a page's `next_cursor` back as
`cursor` to get the next page (`next_cursor` is null on the last page). Timestamps are
ISO 8601 UTC; span times are also given in unix nanoseconds.
"""

TAGS = [
    {"name": "health", "description": "Probes for orchestrators."},
    {"name": "runs", "description": "One run per rule trigger: open, passed or failed."},
    {"name": "incidents", "description": "Failed runs grouped per rule (and group_by values)."},
    {"name": "notifications", "description": "The outbox: one row per transition and target."},
    {"name": "traces", "description": "Stored spans, decoded."},
    {"name": "metrics", "description": "Prometheus metrics."},
    {"name": "rules", "description": "The loaded rules, their run statistics, reloading."},
]


def _always_ready() -> bool:
    return True


async def _invalid_cursor(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_400_BAD_REQUEST)


async def _store_failed(request: Request, exc: Exception) -> JSONResponse:
    # The duckdb message stays in the server's logs (as the exception's cause), not the body.
    return JSONResponse(
        {"detail": "store unavailable"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "1"},
    )


MAX_BODY_BYTES = 64 * 1024  # the API's bodies are a comment and an actor
MAX_ERRORS = 20  # validation errors listed in a 422
MAX_EXCERPT = 80  # characters of the offending input echoed in each


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body, but bounded and safe to encode: each error echoes at most a short
    excerpt of its input (never the whole body), at most MAX_ERRORS errors are listed, and a
    lone surrogate (``"\\ud800"`` is valid JSON) that UTF-8 cannot encode is escaped, which made
    the default handler fail with a 500 while rendering the 422."""
    assert isinstance(exc, RequestValidationError)
    errors = [dict(error) for error in exc.errors()[:MAX_ERRORS]]
    for error in errors:
        if "input" in error:
            error["input"] = _excerpt(error["input"])
        if len(repr(error.get("ctx", ""))) > MAX_EXCERPT:
            del error["ctx"]  # it may quote the input too
    return JSONResponse(
        {"detail": _encodable(jsonable_encoder(errors))},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


def _excerpt(value: Any) -> Any:
    """``value`` itself when short, else the start of its JSON text, ending in "…"."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, default=repr, ensure_ascii=False)
        except (TypeError, ValueError):  # a value json cannot walk (too deep, say)
            text = repr(value)
        if len(text) <= MAX_EXCERPT:
            return value
    return text if len(text) <= MAX_EXCERPT else text[:MAX_EXCERPT] + "…"


class BodyTooLarge(HTTPException):
    """A request body over the limit: 413, and the connection is closed rather than drained.
    An HTTPException, so that FastAPI's body parsing passes it on instead of answering 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(status.HTTP_413_CONTENT_TOO_LARGE,
                         f"request body is over the limit of {limit} bytes",
                         headers={"Connection": "close"})


class BodyLimit:
    """ASGI middleware: a request whose body is over ``limit`` bytes is answered 413 without
    reading past the limit (at once when Content-Length says so, else when the bytes received
    pass it)."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:
            # Raised where no exception handler sees it (outside a route's body parsing).
            if not started:
                await _too_large(self.limit)(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    exc = BodyTooLarge(limit)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _encodable(value: Any) -> Any:
    """``value`` with every string made UTF-8 encodable (a lone surrogate becomes ``\\udXXX``)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_encodable(item) for item in value]
    if isinstance(value, dict):
        return {_encodable(key): _encodable(item) for key, item in value.items()}
    return value


# Any read can meet a failing store (the StoreError handler above).
STORE_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorOut, "description": "The store is unavailable; retry after Retry-After."},
}


def create_app(
    reader: Reader,
    *,
    ready: Callable[[], bool] = _always_ready,
    title: str = "outcomewatch",
    actions: IncidentActions | None = None,
    rules: RulesAdmin | None = None,
    api_token: str | None = None,
    read_token: str | None = None,
    metrics: Callable[[], bytes] | None = None,
    backtest: Backtest | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    suggest: Suggester | None = None,
) -> FastAPI:
    """An app serving ``reader``; ``ready`` is polled by /healthz and /readyz on every request.

    Without ``actions`` the incident actions answer 503 (a read-only deployment); without
    ``metrics`` GET /metrics answers 404; without ``suggest`` GET /api/v1/suggestions answers
    503. ``api_token`` guards writes, ``read_token`` reads
    (see api/auth.py). An empty token is refused (ValueError): it would match no request.
    A request body over ``max_body_bytes`` is answered 413 (see BodyLimit).
    """
    if api_token == "" or read_token == "":
        raise ValueError("api_token and read_token must be None or non-empty")
    # /docs and /redoc are the console's (served offline, see api/console), not FastAPI's CDN ones.
    app = FastAPI(title=title, version=__version__, description=DESCRIPTION, openapi_tags=TAGS,
                  docs_url=None, redoc_url=None)
    app.state.reader = reader
    app.state.ready = ready
    app.state.actions = actions
    app.state.rules_admin = rules
    app.state.metrics = metrics
    app.state.backtest = backtest
    app.state.suggest = suggest
    app.state.tokens = Tokens(api=api_token, read=read_token)
    app.add_exception_handler(InvalidCursor, _invalid_cursor)
    app.add_exception_handler(StoreError, _store_failed)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.include_router(health.router)
    reads = [Depends(require_read)]
    app.include_router(v1.router, prefix="/api/v1", dependencies=reads,
                       responses=AUTH_RESPONSES | STORE_UNAVAILABLE)
    app.include_router(search_routes.router, prefix="/api/v1", dependencies=reads,
                       responses=AUTH_RESPONSES | STORE_UNAVAILABLE)
    app.include_router(actions_routes.router, prefix="/api/v1",
                       dependencies=[Depends(require_write)], responses=AUTH_RESPONSES)
    app.include_router(metrics_routes.router, dependencies=reads, responses=AUTH_RESPONSES)
    app.include_router(rules_routes.read_router, prefix="/api/v1", dependencies=reads,
                       responses=AUTH_RESPONSES)
    app.include_router(suggest_routes.router, prefix="/api/v1", dependencies=reads,
                       responses=AUTH_RESPONSES)
    app.include_router(rules_routes.write_router, prefix="/api/v1",
                       dependencies=[Depends(require_write)], responses=AUTH_RESPONSES)
    app.include_router(backtest_routes.router, prefix="/api/v1",
                       dependencies=[Depends(require_write)], responses=AUTH_RESPONSES)
    console.install(app)
    return app
