"""/api/v1 writes: acknowledge, resolve and reopen an incident.

The transition itself (its timeline row and outbox rows, in one transaction) is the injected
IncidentActions'; this module maps its result to HTTP and answers with the updated incident.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, status
from fastapi.concurrency import run_in_threadpool

from outcomewatch.api.deps import ActionsDep, IncidentActions, ReaderDep
from outcomewatch.api.routes.v1 import IncidentId
from outcomewatch.api.schemas import ErrorOut, IncidentDetailOut
from outcomewatch.api.schemas_ops import ActionIn
from outcomewatch.store.incidents import Action, applies_to
from outcomewatch.store.queries import Reader

router = APIRouter(tags=["incidents"])

DEFAULT_ACTOR = "api"
_RESPONSES: dict[int | str, dict[str, Any]] = {
    # FastAPI's own answer to a body it cannot decode at all (e.g. not UTF-8); a body that is
    # not JSON, or JSON of the wrong shape, is 422.
    400: {"model": ErrorOut, "description": "The body could not be read (not UTF-8)."},
    404: {"model": ErrorOut, "description": "No such incident."},
    409: {"model": ErrorOut, "description": "The action does not apply to the current status."},
    503: {"model": ErrorOut, "description": "Read-only deployment, or the store is unavailable."},
}
OptionalBody = Annotated[
    ActionIn | None, Body(description="Optional; `actor` defaults to `api`.")
]


async def _act(
    action: Action, incident_id: int, body: ActionIn | None, actions: IncidentActions,
    reader: Reader,
) -> IncidentDetailOut:
    body = body or ActionIn()
    result = await actions(
        incident_id, action, actor=body.actor or DEFAULT_ACTOR, comment=body.comment
    )
    if result.status is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"incident {incident_id} not found")
    if not result.changed:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"incident {incident_id} is {result.status}; {action.value} applies to: "
            + ", ".join(applies_to(action)),
        )
    detail = await run_in_threadpool(reader.get_incident, incident_id)
    if detail is None:  # deleted in between: nothing else deletes incidents today
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"incident {incident_id} not found")
    return IncidentDetailOut.from_detail(detail)


@router.post(
    "/incidents/{incident_id}/acknowledge",
    response_model=IncidentDetailOut,
    summary="Acknowledge an open incident",
    responses=_RESPONSES,
)
async def acknowledge(
    incident_id: IncidentId, actions: ActionsDep, reader: ReaderDep,
    body: OptionalBody = None,
) -> IncidentDetailOut:
    """open -> acknowledged. Notifies the route's targets; answers with the updated incident."""
    return await _act(Action.ACKNOWLEDGE, incident_id, body, actions, reader)


@router.post(
    "/incidents/{incident_id}/resolve",
    response_model=IncidentDetailOut,
    summary="Resolve an open or acknowledged incident",
    responses=_RESPONSES,
)
async def resolve(
    incident_id: IncidentId, actions: ActionsDep, reader: ReaderDep,
    body: OptionalBody = None,
) -> IncidentDetailOut:
    """open or acknowledged -> resolved. A failure within the reopen window reopens it."""
    return await _act(Action.RESOLVE, incident_id, body, actions, reader)


@router.post(
    "/incidents/{incident_id}/reopen",
    response_model=IncidentDetailOut,
    summary="Reopen a resolved incident",
    responses=_RESPONSES,
)
async def reopen(
    incident_id: IncidentId, actions: ActionsDep, reader: ReaderDep,
    body: OptionalBody = None,
) -> IncidentDetailOut:
    """resolved -> open."""
    return await _act(Action.REOPEN, incident_id, body, actions, reader)
