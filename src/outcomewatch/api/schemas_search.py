"""Response body of GET /api/v1/search. Field names are a pinned public contract, as in
schemas.py."""

from __future__ import annotations

from pydantic import BaseModel, Field

from outcomewatch.api.schemas import RunOut
from outcomewatch.store.search import SearchResult


class SearchRunOut(RunOut):
    matched: list[str] = Field(
        description="The trigger or evidence attribute keys whose value equals the query.")


class SearchOut(BaseModel):
    query: str
    trace_id: str | None = Field(
        description="The query, when it is a trace id with stored spans or runs.")
    runs: list[SearchRunOut] = Field(
        description="Runs found, newest first: for a trace id, the runs it opened.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page.")

    @classmethod
    def from_result(cls, result: SearchResult) -> SearchOut:
        return cls(
            query=result.query, trace_id=result.trace_id,
            runs=[SearchRunOut(**RunOut.from_row(r).model_dump(),
                               matched=list(result.keys.get(r.id, ())))
                  for r in result.runs.items],
            next_cursor=result.runs.next_cursor,
        )
