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


class OutcomeOut(BaseModel):
    span: str
    service: str
    trace: str | None = Field(default=None,
                              description="`other` for an outcome in another trace.")
    correlate_by: str | None = None
    linked_share: float | None = Field(
        default=None, description="Share of the outcome's sampled spans linked to a trigger.")
    sampled: int | None = Field(default=None,
                                description="Trigger spans sampled (other-trace outcomes).")
    missing_share: float = Field(description="Share of the trigger's traces without it.")
    failing_share: float = Field(description="Share that would fail the proposed selector.")
    status: dict[str, int] = Field(description="Traces by the outcome's status: ok, error, "
                                               "unset.")
    delay_p50_s: float = Field(description="Seconds from the trigger's start to its end.")
    delay_p95_s: float
    delay_p99_s: float


class ObservedOut(BaseModel):
    traces: int = Field(description="Traces the trigger starts.")
    outcomes: list[OutcomeOut]
    followers: int = Field(description="Distinct spans seen after the trigger.")


class BacktestIncidentOut(BaseModel):
    rule: str
    group: dict[str, Any]
    status: str
    failure_count: int
    first_failure: str | None
    last_failure: str | None


class BacktestOut(BaseModel):
    runs: int
    passed: int
    failed: int = Field(description="Runs that would have failed.")
    open: int
    reasons: dict[str, int]
    incidents: list[BacktestIncidentOut] = Field(description="Incidents it would have opened.")


class SuggestionOut(BaseModel):
    rule: dict[str, Any] = Field(description="The rule, as written to a rule file.")
    observed: ObservedOut
    backtest: BacktestOut | None = Field(description="The replay of the proposed rules over "
                                                     "the same spans; null when not run.")


class SuggestionsOut(BaseModel):
    since_ns: int | None = Field(description="Spans received at or after this unix time (ns).")
    trigger: str = Field(description="The glob workflow starts were matched against.")
    min_traces: int
    workflows: int = Field(description="Workflow starts with at least min_traces traces.")
    suggestions: list[SuggestionOut]


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
) -> SuggestionsOut:
    suggester: Suggester | None = getattr(request.app.state, "suggest", None)
    if suggester is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "suggestions are not available in this deployment")
    try:
        window = parse_duration(since)
    except DurationError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"since: {exc}") from exc
    return SuggestionsOut.model_validate(
        suggester(since=window, trigger=trigger, min_traces=min_traces))
