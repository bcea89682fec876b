"""/api/v1 reads: runs, incidents, traces and the notification outbox. The incident actions
(POST) are in routes/actions.py.

Endpoints are sync ``def``: FastAPI runs them in its threadpool, and the Reader gives each call
its own duckdb cursor. A bad ``cursor`` is answered 400 by the InvalidCursor handler in app.py.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response, status

from outcomewatch.api.deps import ReaderDep
from outcomewatch.api.schemas import ErrorOut, IncidentDetailOut, IncidentsPage, RunsPage
from outcomewatch.api.schemas_ops import NotificationsPage, NotificationStatus
from outcomewatch.api.schemas_trace import SpanOut, TraceOut
from outcomewatch.model import FailureReason, IncidentStatus, RunStatus

router = APIRouter()

TRACE_ID_PATTERN = "^[0-9a-f]{32}$"
_TRACE_ID_HELP = "32 lowercase hex characters."
_BIGINT_MAX = 2**63 - 1  # incidents.id is BIGINT; a larger id cannot exist and must not reach SQL

IncidentId = Annotated[int, Path(ge=1, le=_BIGINT_MAX)]
Limit = Annotated[int, Query(ge=1, le=1000, description="Page size.")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, description="`next_cursor` of the previous page; omit for the first."),
]
_BAD_CURSOR: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "The cursor is not one we issued."}
}


@router.get(
    "/runs",
    response_model=RunsPage,
    tags=["runs"],
    summary="List rule runs, newest first",
    responses=_BAD_CURSOR,
)
def list_runs(
    reader: ReaderDep,
    trace_id: Annotated[
        str | None, Query(pattern=TRACE_ID_PATTERN, description=_TRACE_ID_HELP)
    ] = None,
    rule: str | None = None,
    run_status: Annotated[RunStatus | None, Query(alias="status")] = None,
    reason: Annotated[FailureReason | None, Query(description="Failed runs by reason.")] = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> RunsPage:
    """Runs ordered by ``opened_at`` descending; every given filter must match."""
    page = reader.list_runs_by(
        trace_id=trace_id, rule=rule, status=run_status,
        reason=None if reason is None else reason.value, limit=limit, cursor=cursor,
    )
    return RunsPage.from_page(page)


@router.get(
    "/incidents",
    response_model=IncidentsPage,
    tags=["incidents"],
    summary="List incidents, most recently failing first",
    responses=_BAD_CURSOR,
)
def list_incidents(
    reader: ReaderDep,
    incident_status: Annotated[IncidentStatus | None, Query(alias="status")] = None,
    rule: str | None = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> IncidentsPage:
    """Incidents ordered by ``last_failure_at`` descending; every given filter must match."""
    page = reader.list_incidents(status=incident_status, rule=rule, limit=limit, cursor=cursor)
    return IncidentsPage.from_page(page)


@router.get(
    "/incidents/{incident_id}",
    response_model=IncidentDetailOut,
    tags=["incidents"],
    summary="One incident with its latest failures",
    responses={404: {"model": ErrorOut, "description": "No such incident."}},
)
def get_incident(
    reader: ReaderDep,
    incident_id: IncidentId,
    failures: Annotated[int, Query(ge=1, le=200, description="How many failures.")] = 20,
) -> IncidentDetailOut:
    """The incident, its timeline (oldest first) and its ``failures`` most recent failures
    (newest first)."""
    detail = reader.get_incident(incident_id, failures_limit=failures)
    if detail is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"incident {incident_id} not found")
    return IncidentDetailOut.from_detail(detail)


@router.get(
    "/traces/{trace_id}",
    response_model=TraceOut,
    tags=["traces"],
    summary="Every stored span of a trace",
    responses={404: {"model": ErrorOut, "description": "No span of this trace is stored."},
               **_BAD_CURSOR},
)
def get_trace(
    reader: ReaderDep,
    trace_id: Annotated[str, Path(pattern=TRACE_ID_PATTERN, description=_TRACE_ID_HELP)],
    limit: Annotated[int, Query(ge=1, le=10_000, description="Spans per page.")] = 1000,
    cursor: Cursor = None,
) -> Response:
    """The trace's spans, each once (retried exports de-duplicated), ordered by start time
    (ties by span id), ``limit`` per page: pass ``next_cursor`` back as ``cursor`` for the next
    (null on the last page). A trace of up to 1000 spans is one page."""
    page = reader.get_trace_page(trace_id, limit=limit, cursor=cursor)
    if page is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"trace {trace_id} not found")
    out = TraceOut(trace_id=trace_id, spans=[SpanOut.from_span(s) for s in page.items],
                   next_cursor=page.next_cursor)
    # Serialised here, once, by pydantic: returned as a model, FastAPI would validate it a
    # second time against response_model (the schema it documents) before serialising it.
    return Response(out.model_dump_json(), media_type="application/json")


@router.get(
    "/notifications",
    response_model=NotificationsPage,
    tags=["notifications"],
    summary="List notifications (the outbox), newest first",
    responses=_BAD_CURSOR,
)
def list_notifications(
    reader: ReaderDep,
    notification_status: Annotated[NotificationStatus | None, Query(alias="status")] = None,
    incident_id: Annotated[int | None, Query(ge=1, le=_BIGINT_MAX)] = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> NotificationsPage:
    """One row per incident transition and notification target, ordered by ``created_at``
    descending; every given filter must match. ``failed`` rows are retried until sent."""
    page = reader.list_notifications(
        status=None if notification_status is None else notification_status.value,
        incident_id=incident_id, limit=limit, cursor=cursor,
    )
    return NotificationsPage.from_page(page)
