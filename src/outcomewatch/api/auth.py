"""Bearer tokens. ``api_token`` guards every write (POST) and ``read_token`` every read of
/api/v1 and /metrics; whoever holds the api token may also read. With no token configured the
corresponding requests are open. The probes and the docs are always open.

Missing or non-Bearer credentials answer 401 with ``WWW-Authenticate: Bearer``; a wrong token
403. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# For OpenAPI: what a guarded route may answer besides its own responses.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No bearer token, while a token is configured."},
    403: {"description": "Wrong bearer token."},
}

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


@dataclass(frozen=True, slots=True)
class Tokens:
    api: str | None = None
    read: str | None = None

    def for_reads(self) -> tuple[str, ...]:
        """The tokens a read accepts; empty when reads are open."""
        if self.read is None:
            return ()
        return tuple(t for t in (self.read, self.api) if t is not None)

    def for_writes(self) -> tuple[str, ...]:
        """The tokens a write accepts; empty when writes are open. Without an api token, writes
        are guarded like reads: a deployment that protects reads never leaves writes open."""
        return (self.api,) if self.api is not None else self.for_reads()


def _check(accepted: tuple[str, ...], credentials: HTTPAuthorizationCredentials | None) -> None:
    if not accepted:
        return
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    given = credentials.credentials.encode()
    # Check every accepted token (no early exit), so timing does not tell which one was close.
    matches = [hmac.compare_digest(given, token.encode()) for token in accepted]
    if not any(matches):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid token")


def require_read(request: Request, credentials: Credentials) -> None:
    tokens: Tokens = request.app.state.tokens
    _check(tokens.for_reads(), credentials)


def require_write(request: Request, credentials: Credentials) -> None:
    tokens: Tokens = request.app.state.tokens
    _check(tokens.for_writes(), credentials)
