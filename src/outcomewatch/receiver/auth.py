"""Optional bearer-token auth on OTLP: ``authorization: Bearer <token>``, as gRPC metadata or as
an HTTP header (RFC 6750). The OTel exporters send it from their ``headers`` option or the
``OTEL_EXPORTER_OTLP_HEADERS`` variable (``authorization=Bearer%20<token>``).
"""

from __future__ import annotations

import hmac
import re

# RFC 6750's b64token: what a header can carry without quoting.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def check_token(token: str | None) -> None:
    """Fail fast on a token no client could send: a receiver would refuse everyone, silently."""
    if token is not None and _TOKEN.fullmatch(token) is None:
        raise ValueError(
            "the OTLP bearer token must be non-empty and made of letters, digits and -._~+/ "
            "(optionally ending in =)"
        )


def authorized(header: str | None, token: str) -> bool:
    """Whether ``header`` (an Authorization value, or None) is ``Bearer <token>``.

    The scheme is case-insensitive (RFC 7235); the token is compared in constant time.
    """
    if header is None:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode(), token.encode()
    )
