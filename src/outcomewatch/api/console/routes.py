"""The console: server-rendered pages on the API's port.

Every page reads through the same store queries as the JSON API and renders the API's own
response models, so a page and the JSON never disagree. Templates are Jinja2 with autoescape
(every span string is escaped); each page is served with a strict Content-Security-Policy
(scripts and styles from this server only, no inline script, no CDN, no web fonts).

With a read token configured, pages need it too: as a bearer header, or as the session cookie
the login page sets (the browser forgets it when it closes). Writes (the incident buttons) call
the API with the api token, which the page asks for and keeps in sessionStorage.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote

import jinja2
from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from outcomewatch import __version__
from outcomewatch.api.auth import Tokens
from outcomewatch.api.console import view
from outcomewatch.api.deps import ReaderDep
from outcomewatch.api.routes.rules import RulesAdmin, list_rules
from outcomewatch.api.routes.v1 import TRACE_ID_PATTERN, IncidentId
from outcomewatch.api.schemas import IncidentDetailOut, IncidentOut, RunOut
from outcomewatch.api.schemas_search import SearchOut
from outcomewatch.api.schemas_trace import SpanOut
from outcomewatch.model import IncidentStatus, RunStatus, Severity
from outcomewatch.store import console as console_queries
from outcomewatch.store.search import MAX_QUERY, search

HERE = Path(__file__).resolve().parent
TOKEN_COOKIE = "outcomewatch_token"
PAGE_SIZE = 100
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every template, whatever its extension
    undefined=jinja2.StrictUndefined,
)
_env.filters.update(duration=view.duration, iso=view.iso, clock=view.clock, value=view.value,
                    group_text=view.group_text)
templates = Jinja2Templates(env=_env)

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)


class NeedsToken(Exception):
    """A page was asked for without the read token; answered with the login page (401)."""


def require_page_read(request: Request) -> None:
    tokens: Tokens = request.app.state.tokens
    accepted = tokens.for_reads()
    if not accepted:
        return
    header = request.headers.get("authorization", "")
    # The login page sets the cookie with encodeURIComponent.
    given = header[7:] if header.lower().startswith("bearer ") else unquote(
        request.cookies.get(TOKEN_COOKIE, ""))
    matches = [hmac.compare_digest(given.encode(), token.encode()) for token in accepted]
    if not any(matches):
        raise NeedsToken


def render(request: Request, template: str, context: dict[str, Any], *,
           status_code: int = 200) -> Response:
    tokens: Tokens = request.app.state.tokens
    base = {"version": __version__, "query": "", "nav": template.removesuffix(".html"),
            "writes_need_token": bool(tokens.for_writes())}
    return templates.TemplateResponse(request, template, base | context,
                                      status_code=status_code, headers=SECURITY_HEADERS)


async def needs_token(request: Request, exc: Exception) -> Response:
    return render(request, "login.html", {"title": "Sign in"}, status_code=401)


def _now() -> datetime:
    return datetime.now(UTC)


def _counts(reader: ReaderDep) -> console_queries.Counts:
    return console_queries.counts(reader, now=_now())


Text = Annotated[str | None, Query(max_length=200)]


@router.get("/", dependencies=[Depends(require_page_read)])
def incidents_page(
    request: Request, reader: ReaderDep,
    incident_status: Annotated[IncidentStatus | None, Query(alias="status")] = None,
    rule: Text = None, owner: Text = None, severity: Severity | None = None,
) -> Response:
    """Open and acknowledged incidents first, then the recently resolved ones."""
    wanted = [incident_status] if incident_status else list(IncidentStatus)
    incidents: list[IncidentOut] = []
    for status in wanted:
        page = reader.list_incidents_by(status=status, rule=rule or None, owner=owner or None,
                                        severity=severity, limit=PAGE_SIZE)
        incidents += [IncidentOut.from_row(row) for row in page.items]
    rules_admin: RulesAdmin | None = request.app.state.rules_admin
    rule_names = sorted({r.name for r in rules_admin.rules.rules} if rules_admin else set())
    owners = sorted({r.owner for r in rules_admin.rules.rules if r.owner}
                    if rules_admin else set())
    return render(request, "incidents.html", {
        "title": "Incidents", "counts": _counts(reader), "incidents": incidents,
        "filters": {"status": incident_status.value if incident_status else "",
                    "rule": rule or "", "owner": owner or "",
                    "severity": severity.value if severity else ""},
        "rule_names": rule_names, "owners": owners,
        "statuses": [s.value for s in IncidentStatus], "severities": [s.value for s in Severity],
    })


@router.get("/incidents/{incident_id}", dependencies=[Depends(require_page_read)])
def incident_page(request: Request, reader: ReaderDep, incident_id: IncidentId) -> Response:
    detail = reader.get_incident(incident_id, failures_limit=5)
    if detail is None:
        return render(request, "missing.html", {
            "title": "Not found", "counts": _counts(reader),
            "message": f"incident {incident_id} not found"}, status_code=404)
    incident = IncidentDetailOut.from_detail(detail)
    waterfalls = {}
    for failure in incident.failures[:1]:  # the newest failure's trace, drawn in full
        spans = reader.get_trace(failure.trace_id) or []
        trigger = failure.trigger.get("span_id")
        waterfalls[failure.run_id] = view.waterfall(
            [SpanOut.from_span(s) for s in spans], missing=failure.missing,
            trigger_span_id=trigger if isinstance(trigger, str) else None)
    return render(request, "incident.html", {
        "title": f"#{incident.id} {incident.rule}", "counts": _counts(reader),
        "incident": incident, "waterfalls": waterfalls,
    })


@router.get("/traces/{trace_id}", dependencies=[Depends(require_page_read)])
def trace_page(
    request: Request, reader: ReaderDep,
    trace_id: Annotated[str, PathParam(pattern=TRACE_ID_PATTERN)],
) -> Response:
    spans = reader.get_trace(trace_id)
    runs = reader.list_runs(trace_id=trace_id, rule=None, status=None, limit=PAGE_SIZE,
                            cursor=None)
    if spans is None and not runs.items:
        return render(request, "missing.html", {
            "title": "Not found", "counts": _counts(reader),
            "message": f"trace {trace_id} not found"}, status_code=404)
    span_outs = [SpanOut.from_span(s) for s in spans or []]
    missing = sorted({name for run in runs.items for name in run.missing})
    return render(request, "trace.html", {
        "title": f"Trace {trace_id[:8]}…", "counts": _counts(reader), "trace_id": trace_id,
        "rows": view.waterfall(span_outs, missing=missing),
        "services": sorted({s.service for s in span_outs}),
        "runs": [RunOut.from_row(r) for r in runs.items],
        "duration_ms": (max(s.end_ns for s in span_outs) - min(s.start_ns for s in span_outs))
        / 1e6 if span_outs else None,
    })


@router.get("/runs", dependencies=[Depends(require_page_read)])
def runs_page(
    request: Request, reader: ReaderDep, rule: Text = None,
    run_status: Annotated[RunStatus | None, Query(alias="status")] = None,
    reason: Text = None, cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    page = reader.list_runs_by(rule=rule or None, status=run_status, reason=reason or None,
                               limit=PAGE_SIZE, cursor=cursor)
    rules_admin: RulesAdmin | None = request.app.state.rules_admin
    return render(request, "runs.html", {
        "title": "Runs", "counts": _counts(reader),
        "runs": [RunOut.from_row(r) for r in page.items], "next_cursor": page.next_cursor,
        "filters": {"rule": rule or "", "status": run_status.value if run_status else "",
                    "reason": reason or ""},
        "rule_names": sorted(r.name for r in rules_admin.rules.rules) if rules_admin else [],
        "statuses": [s.value for s in RunStatus],
        "reasons": ["trace_idle", "deadline", "forbidden", "count", "max_duration", "missed",
                    "evicted"],
    })


@router.get("/rules", dependencies=[Depends(require_page_read)])
def rules_page(request: Request, reader: ReaderDep) -> Response:
    admin: RulesAdmin | None = request.app.state.rules_admin
    if admin is None:
        return render(request, "missing.html", {
            "title": "No rules", "counts": _counts(reader),
            "message": "no rules are loaded here (a read-only deployment)"}, status_code=503)
    listing = list_rules(admin, reader)
    chart = console_queries.hourly_verdicts(reader, now=_now())
    peak = max((b.passed + b.failed for buckets in chart.values() for b in buckets), default=0)
    return render(request, "rules.html", {
        "title": "Rules", "counts": _counts(reader), "rules": listing.rules,
        "loaded_at": listing.loaded_at, "chart": chart, "peak": max(peak, 1),
        "last_reload": admin.last_reload,
        "hours": console_queries.CHART_HOURS,
    })


@router.get("/search", dependencies=[Depends(require_page_read)])
def search_page(
    request: Request, reader: ReaderDep,
    q: Annotated[str, Query(max_length=MAX_QUERY)] = "",
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    """A trace id goes straight to its trace; any other value lists the runs it finds."""
    result = SearchOut.from_result(search(reader, q, limit=PAGE_SIZE, cursor=cursor)) \
        if q.strip() else None
    if result is not None and result.trace_id is not None:
        return RedirectResponse(f"/traces/{result.trace_id}", status_code=303)
    return render(request, "search.html", {
        "title": f"Search {q}" if q else "Search", "counts": _counts(reader), "query": q,
        "result": result,
    })
