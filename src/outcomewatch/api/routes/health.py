"""Liveness/readiness probe."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request, Response, status

from outcomewatch.api.schemas import HealthOut

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=HealthOut,
    summary="Readiness probe",
    responses={503: {"model": HealthOut, "description": "Still starting up."}},
)
def healthz(request: Request, response: Response) -> HealthOut:
    """200 ``ok`` once the service is ready, 503 ``starting`` before."""
    ready: Callable[[], bool] = request.app.state.ready
    if ready():
        return HealthOut(status="ok")
    response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return HealthOut(status="starting")
