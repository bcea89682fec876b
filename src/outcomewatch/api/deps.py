"""Request-scoped dependencies. The Reader, the actions and the tokens live on ``app.state`` (set
by create_app) rather than in module globals, so several apps, e.g. one per test, can coexist in
one process."""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import Depends, HTTPException, Request, status

from outcomewatch.store.incidents import Action, ActionResult
from outcomewatch.store.queries import Reader


class IncidentActions(Protocol):
    """Acknowledge, resolve or reopen an incident (see store/incidents.act), committed before it
    returns. ``ActionResult.status`` is None when there is no such incident; ``changed`` is False
    when the action does not apply to the incident's current status."""

    async def __call__(
        self, incident_id: int, action: Action, *, actor: str, comment: str | None
    ) -> ActionResult: ...


def get_reader(request: Request) -> Reader:
    reader: Reader = request.app.state.reader
    return reader


def get_actions(request: Request) -> IncidentActions:
    actions: IncidentActions | None = request.app.state.actions
    if actions is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "this deployment is read-only: no incident actions"
        )
    return actions


ReaderDep = Annotated[Reader, Depends(get_reader)]
ActionsDep = Annotated[IncidentActions, Depends(get_actions)]
