"""GET /api/v1/search: a trace id, or an attribute value of runs' triggers and evidence."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from outcomewatch.api.deps import ReaderDep
from outcomewatch.api.routes.v1 import _BAD_CURSOR, Cursor, Limit
from outcomewatch.api.schemas_search import SearchOut
from outcomewatch.store.search import MAX_QUERY, search

router = APIRouter(tags=["runs"])


@router.get(
    "/search",
    response_model=SearchOut,
    summary="Find a trace, or the runs whose trigger or evidence carries a value",
    responses=_BAD_CURSOR,
)
def search_runs(
    reader: ReaderDep,
    q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY,
                            description="A trace id, or a value such as a customer id.")],
    limit: Limit = 100,
    cursor: Cursor = None,
) -> SearchOut:
    """A 32-hex trace id finds that trace and the runs it opened; any other value finds the
    runs with a trigger or evidence attribute equal to it (exact, as text), newest first.
    Served from the index written with each run; no span is decoded."""
    return SearchOut.from_result(search(reader, q, limit=limit, cursor=cursor))
