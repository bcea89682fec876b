"""GET /metrics: the Prometheus text exposition, produced by the injected ``metrics()``."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, HTTPException, Request, Response, status

from outcomewatch.api.schemas import ErrorOut

# prometheus_client.CONTENT_TYPE_LATEST as of 0.20, spelled out: the text format 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={
        200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
              "description": "Prometheus text format."},
        404: {"model": ErrorOut, "description": "Metrics are not enabled."},
    },
)
def metrics(request: Request) -> Response:
    produce: Callable[[], bytes] | None = request.app.state.metrics
    if produce is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "metrics are not enabled")
    return Response(produce(), media_type=CONTENT_TYPE)
