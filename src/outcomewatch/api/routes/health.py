"""Liveness/readiness probes; always open, whatever tokens are configured."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request, Response, status

from outcomewatch.api.schemas_ops import HealthOut, ReadyOut

router = APIRouter(tags=["health"])


def _ready(request: Request) -> bool:
    ready: Callable[[], bool] = request.app.state.ready
    return ready()


@router.get(
    "/healthz",
    response_model=HealthOut,
    summary="Liveness probe",
    responses={503: {"model": HealthOut, "description": "Still starting up."}},
)
def healthz(request: Request, response: Response) -> HealthOut:
    """200 ``ok`` once the service has been ready (it stays 200 while draining or while
    storage fails, so an orchestrator does not restart it for that: see /readyz), 503
    ``starting`` before."""
    if getattr(request.app.state, "started", False) or _ready(request):
        request.app.state.started = True
        return HealthOut(status="ok")
    response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return HealthOut(status="starting")


@router.get(
    "/readyz",
    response_model=ReadyOut,
    summary="Readiness probe (Kubernetes style)",
    responses={503: {"model": ReadyOut, "description": "Not ready: starting or stopping."}},
)
def readyz(request: Request, response: Response) -> ReadyOut:
    """200 ``ready`` while the service is ready, 503 ``not ready`` otherwise."""
    if _ready(request):
        return ReadyOut(status="ready")
    response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return ReadyOut(status="not ready")
