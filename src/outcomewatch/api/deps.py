"""Request-scoped dependencies. The Reader lives on ``app.state`` (set by create_app) rather
than in a module global, so several apps, e.g. one per test, can coexist in one process."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from outcomewatch.store.queries import Reader


def get_reader(request: Request) -> Reader:
    reader: Reader = request.app.state.reader
    return reader


ReaderDep = Annotated[Reader, Depends(get_reader)]
