"""The console pages and the offline API docs, mounted on the API's app by ``install``."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from outcomewatch.api.console.routes import (
    HERE,
    SECURITY_HEADERS,
    NeedsToken,
    needs_token,
    router,
    templates,
)

# Swagger UI and ReDoc from the fastapi-offline wheel: no CDN, so /docs works without internet.
DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
# Swagger UI and ReDoc set inline styles and ReDoc starts a blob: worker; scripts stay 'self'.
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
            "worker-src 'self' blob:; base-uri 'none'; frame-ancestors 'none'")


def install(app: FastAPI) -> None:
    """Add the console pages, their static files and /docs and /redoc to ``app``, which must
    have been created with ``docs_url=None, redoc_url=None``."""
    app.mount("/static/console", StaticFiles(directory=HERE / "static"), name="console-static")
    app.mount("/static/docs", StaticFiles(directory=DOCS_ASSETS), name="docs-static")
    app.add_exception_handler(NeedsToken, needs_token)
    app.include_router(router)

    def docs_page(template: str, title: str) -> Response:
        html = templates.get_template(template).render(
            title=title, openapi_url=app.openapi_url or "/openapi.json")
        return HTMLResponse(html, headers=SECURITY_HEADERS | {"Content-Security-Policy": DOCS_CSP})

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> Response:
        return docs_page("docs.html", f"{app.title} API")

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> Response:
        return docs_page("redoc.html", f"{app.title} API")
