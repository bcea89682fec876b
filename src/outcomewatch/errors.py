"""One exception tree for outcomewatch.

    OutcomewatchError
    ├── InvalidPayload      an OTLP request we refuse (gRPC INVALID_ARGUMENT / HTTP 400)
    ├── PayloadTooLarge     a body over a size limit, before or after decompression (HTTP 413)
    ├── RuleError           one or more problems in rule files; ``problems`` holds each one
    ├── DurationError       a duration string that does not parse ("10 min", "-5s")
    ├── Overloaded          a queue is full; the client should retry (gRPC UNAVAILABLE / HTTP 503)
    └── StoreError          DuckDB failed; the cause is kept as ``__cause__`` (UNAVAILABLE / 503)

Foreign errors (protobuf DecodeError, duckdb.Error, yaml errors) are translated once, at the
boundary that sees them, with the cause kept.
"""

from __future__ import annotations

from dataclasses import dataclass


class OutcomewatchError(Exception):
    """Base of every error outcomewatch raises on purpose."""


class InvalidPayload(OutcomewatchError):
    """An OTLP request that cannot be accepted as a whole."""


class PayloadTooLarge(InvalidPayload):
    """A request body (compressed or decompressed) over the configured limit."""


class DurationError(OutcomewatchError, ValueError):
    """A duration string that is not of the form 250ms, 30s, 10m, 1h30m, 7d."""


@dataclass(frozen=True)
class Problem:
    """One error in a rule file, located as precisely as the YAML allows.

    ``line`` and ``column`` are 1-based; ``column`` is 1 when only the line is known.
    """

    file: str
    line: int
    message: str
    column: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class RuleError(OutcomewatchError):
    """Rule files that cannot be loaded; ``problems`` lists every error found, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class Overloaded(OutcomewatchError):
    """Back-pressure: the request was not accepted and should be retried after ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreError(OutcomewatchError):
    """The database refused or failed an operation."""
