"""POST /api/v1/replay: a backtest of rules against the server's own stored spans.

The body is one rule file (YAML, as ``outcomewatch check`` reads it); ``since`` bounds the
spans by receive time. The server evaluates it on a read transaction of its own database while
ingest goes on, writes nothing, and answers what ``outcomewatch replay --format json`` prints.
Invalid rules are answered 422 with every problem located in ``request.yaml``. Protected like
the other writes (it is costly: one at a time per server is wise; a second waits its turn).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, JsonValue

from outcomewatch.api.routes.rules import ProblemOut
from outcomewatch.api.schemas import ErrorOut
from outcomewatch.durations import parse_duration
from outcomewatch.errors import RuleError


class WindowOut(BaseModel):
    first_received: str | None
    last_received: str | None
    settled_at: str | None


class RuleReplayOut(BaseModel):
    rule: str
    passed: int
    failed: int
    open: int
    reasons: dict[str, int] = Field(description="Failed runs by reason.")


class IncidentReplayOut(BaseModel):
    rule: str
    group: dict[str, JsonValue]
    status: str
    failure_count: int
    first_failure: str | None
    last_failure: str | None


class FailedRunReplayOut(BaseModel):
    id: str
    rule: str
    trace_id: str
    reason: str | None
    missing: list[str]
    opened_at: str | None
    closed_at: str | None


class ReplayOut(BaseModel):
    """What ``outcomewatch replay --format json`` prints."""

    window: WindowOut
    rules: list[RuleReplayOut]
    incidents: list[IncidentReplayOut]
    failed_runs: list[FailedRunReplayOut]
    stats: dict[str, JsonValue] = Field(description="Spans read, requests replayed, seconds.")


class Backtest(Protocol):
    async def __call__(self, rules_yaml: str, *, since: timedelta | None,
                       trace_idle: timedelta | None) -> dict[str, Any]: ...


router = APIRouter(tags=["rules"])

# The body is read raw (YAML is no JSON); its schema is declared for the OpenAPI document.
_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/yaml": {"schema": {"type": "string"}, "example":
                         "rules:\n  - name: invoice-paid\n    owner: billing\n"
                         "    trigger: {span: stripe.webhook}\n"
                         "    expect: [{span: email.delivered}]\n"}}}}


def _duration(text: str | None, name: str) -> timedelta | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{name}: {exc}") from None


@router.post(
    "/replay",
    summary="Backtest rules against the stored spans (writes nothing)",
    openapi_extra=_BODY,
    response_model=ReplayOut,
    responses={
        400: {"model": ErrorOut,
              "description": "A query parameter is not a duration, or the body not UTF-8."},
        422: {"description": "Invalid rules: `problems`, each with file, line, column."},
        503: {"model": ErrorOut, "description": "No backtest here, or the store is unavailable."},
    },
)
async def replay(
    request: Request,
    since: Annotated[str | None, Query(description="Only spans received this recently "
                                                   "(e.g. `7d`).")] = None,
    trace_idle: Annotated[str | None, Query(description="The idle time to judge by "
                                                        "(default: the server's).")] = None,
) -> ReplayOut | JSONResponse:
    """The runs and incidents the rules would have produced (``replay --format json``)."""
    backtest: Backtest | None = request.app.state.backtest
    if backtest is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no backtest here")
    try:
        rules_yaml = (await request.body()).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the body is not UTF-8") from None
    try:
        answer = await backtest(rules_yaml, since=_duration(since, "since"),
                                trace_idle=_duration(trace_idle, "trace_idle"))
    except RuleError as exc:
        problems = [ProblemOut(file=p.file, line=p.line, column=p.column, message=p.message)
                    .model_dump() for p in exc.problems]
        return JSONResponse({"status": "rejected", "problems": problems}, status_code=422)
    return ReplayOut.model_validate(answer)
