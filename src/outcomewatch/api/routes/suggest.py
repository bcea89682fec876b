"""GET /api/v1/suggestions: outcome rules proposed from the stored traces (what
``outcomewatch suggest`` prints as JSON; ``suggest --api`` renders this answer).

The api package may not import the offline package (README, "Layout"), so the computation is
handed in: ``create_app(suggest=...)`` takes a ``Suggester``, which the server builds from
``offline.suggest.suggest`` over a cursor of its own connection. Without one the route answers
503.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, Field

from outcomewatch.api.schemas import ErrorOut
from outcomewatch.durations import parse_duration
from outcomewatch.errors import DurationError


class Suggester(Protocol):
    """Computes the report (see offline.suggest.suggest) over the spans received since
    ``since`` ago; raises StoreError when the store cannot be read."""

    def __call__(self, *, since: timedelta, trigger: str, min_traces: int) -> dict[str, Any]: ...


class SuggestionsOut(BaseModel):
    since_ns: int | None = Field(description="Spans received at or after this unix time (ns).")
    trigger: str = Field(description="The glob workflow starts were matched against.")
    min_traces: int
    workflows: int = Field(description="Workflow starts with at least min_traces traces.")
    suggestions: list[dict[str, Any]] = Field(
        description="Per proposal: `rule` (as in a rule file), `observed` (traces, and per "
                    "outcome its missing and failing shares, status mix, p50/p95/p99 delay in "
                    "seconds) and `backtest` (runs, passed, failed, open, reasons, incidents; "
                    "null when not run).")


router = APIRouter(tags=["rules"])


@router.get(
    "/suggestions", response_model=SuggestionsOut, summary="Rules proposed from stored traces",
    responses={400: {"model": ErrorOut, "description": "An invalid `since` duration."},
               503: {"model": ErrorOut,
                     "description": "Suggestions are not available here, or the store is "
                                    "unavailable."}},
)
def suggestions(
    request: Request,
    since: Annotated[str, Query(max_length=64, description="A duration: 7d, 24h, 30m.")] = "7d",
    trigger: Annotated[str, Query(min_length=1, max_length=256,
                                  description="Glob on the start span's name.")] = "*",
    min_traces: Annotated[int, Query(ge=1, le=10**9)] = 20,
) -> dict[str, Any]:
    suggester: Suggester | None = getattr(request.app.state, "suggest", None)
    if suggester is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "suggestions are not available in this deployment")
    try:
        window = parse_duration(since)
    except DurationError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"since: {exc}") from exc
    return suggester(since=window, trigger=trigger, min_traces=min_traces)
