"""The FastAPI application factory. Nothing is created at import time: the caller owns the
Reader (and its duckdb connection) and passes it in."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

from outcomewatch import __version__
from outcomewatch.api.routes import health, v1
from outcomewatch.errors import StoreError
from outcomewatch.store.queries import InvalidCursor, Reader

DESCRIPTION = """\
Read-only view of outcomewatch: the runs of outcome rules over traces, the incidents opened
when runs fail, and the stored spans of any trace.

Listings are newest first and paginated by keyset: pass a page's `next_cursor` back as
`cursor` to get the next page (`next_cursor` is null on the last page). Timestamps are
ISO 8601 UTC; span times are also given in unix nanoseconds.
"""

TAGS = [
    {"name": "health", "description": "Probes for orchestrators."},
    {"name": "runs", "description": "One run per rule trigger: open, passed or failed."},
    {"name": "incidents", "description": "Failed runs grouped per rule."},
    {"name": "traces", "description": "Stored spans, decoded."},
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


def create_app(
    reader: Reader,
    *,
    ready: Callable[[], bool] = _always_ready,
    title: str = "outcomewatch",
) -> FastAPI:
    """An app serving ``reader``; ``ready`` is polled by GET /healthz on every request."""
    app = FastAPI(title=title, version=__version__, description=DESCRIPTION, openapi_tags=TAGS)
    app.state.reader = reader
    app.state.ready = ready
    app.add_exception_handler(InvalidCursor, _invalid_cursor)
    app.add_exception_handler(StoreError, _store_failed)
    app.include_router(health.router)
    app.include_router(v1.router, prefix="/api/v1")
    return app
