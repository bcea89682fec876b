"""/api/v1/rules: the loaded rules with their run statistics, and a reload.

A reload that finds errors changes nothing (the running rules stay) and answers 422 with every
problem located as ``outcomewatch check`` does; the server also reloads on SIGHUP and when the
rule files change.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from outcomewatch.api.deps import ReaderDep
from outcomewatch.api.schemas import ErrorOut
from outcomewatch.rules import Rule, RuleSet
from outcomewatch.rules.source import ReloadResult


class RulesAdmin(Protocol):
    @property
    def rules(self) -> RuleSet: ...

    @property
    def loaded_at(self) -> datetime: ...

    @property
    def last_reload(self) -> ReloadResult | None:
        """The latest reload (None before the first): its problems when it was rejected."""

    async def reload(self) -> ReloadResult: ...


def get_admin(request: Request) -> RulesAdmin:
    admin: RulesAdmin | None = request.app.state.rules_admin
    if admin is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no rules are loaded here")
    return admin


AdminDep = Annotated[RulesAdmin, Depends(get_admin)]


class RuleOut(BaseModel):
    name: str
    description: str
    owner: str
    route: str
    severity: str
    source: str = Field(description="The file the rule came from.")
    line: int
    trigger: str = Field(description="The trigger's span pattern.")
    expect: list[str] = Field(description="The expectations' span patterns.")
    within: float | None = Field(description="Seconds, or null.")
    runs_passed: int
    runs_failed: int
    runs_open: int
    time_to_outcome_p50_s: float | None = Field(
        description="Median seconds from a run's opening to its passing verdict.")
    time_to_outcome_p95_s: float | None


class RulesOut(BaseModel):
    rules: list[RuleOut]
    loaded_at: datetime


class ProblemOut(BaseModel):
    file: str
    line: int
    column: int
    message: str


class ReloadOut(BaseModel):
    status: str = Field(description="`reloaded`, or `rejected` with the problems.")
    rules: int
    loaded_at: datetime
    problems: list[ProblemOut]


def _rule_out(rule: Rule, stats: Mapping[str, tuple[int, int, int, float | None, float | None]]
              ) -> RuleOut:
    passed, failed, still_open, p50, p95 = stats.get(rule.name, (0, 0, 0, None, None))
    return RuleOut(
        name=rule.name, description=rule.description, owner=rule.owner, route=rule.route,
        severity=rule.severity.value, source=rule.source, line=rule.line,
        trigger=rule.trigger.span, expect=[s.span for s in rule.expect],
        within=rule.within.total_seconds() if rule.within else None,
        runs_passed=passed, runs_failed=failed, runs_open=still_open,
        time_to_outcome_p50_s=p50, time_to_outcome_p95_s=p95,
    )


# get_admin answers 503 without a RulesAdmin; list_rules also reads the store (StoreError: 503).
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorOut,
          "description": "No rules are loaded here, or the store is unavailable."},
}
read_router = APIRouter(tags=["rules"], responses=_UNAVAILABLE)
write_router = APIRouter(tags=["rules"], responses=_UNAVAILABLE)


@read_router.get("/rules", response_model=RulesOut, summary="The loaded rules and their runs")
def list_rules(admin: AdminDep, reader: ReaderDep) -> RulesOut:
    stats = reader.rule_stats()
    return RulesOut(rules=[_rule_out(r, stats) for r in admin.rules.rules],
                    loaded_at=admin.loaded_at)


@write_router.post(
    "/rules/reload", response_model=ReloadOut, summary="Reload the rule files",
    responses={422: {"model": ReloadOut, "description": "Invalid rules; the old set runs on."}},
)
async def reload_rules(admin: AdminDep) -> ReloadOut | JSONResponse:
    result = await admin.reload()
    body = ReloadOut(
        status="rejected" if result.problems else "reloaded", rules=result.rules,
        loaded_at=result.loaded_at,
        problems=[ProblemOut(file=p.file, line=p.line, column=p.column, message=p.message)
                  for p in result.problems],
    )
    if result.problems:
        return JSONResponse(body.model_dump(mode="json"), status_code=422)
    return body
