"""What the gRPC and HTTP receivers share: limits, the sink contract, the retry hint given to a
client that is refused under back-pressure, and a gzip/deflate decoder that cannot be bombed.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from outcomewatch.errors import InvalidPayload, Overloaded, PayloadTooLarge, StoreError
from outcomewatch.otlp import SpanBatch
from outcomewatch.otlp_limits import SpanLimits

logger = logging.getLogger("outcomewatch.receiver")

MiB = 1024 * 1024

Sink = Callable[[SpanBatch], Awaitable[None]]
"""Awaited with each batch that holds at least one accepted span; returns once the spans are
durably committed (only then is the export acknowledged). May raise Overloaded or StoreError,
which the receivers answer as retryable (gRPC UNAVAILABLE, HTTP 503 + Retry-After)."""

# A StoreError carries no hint of its own. A failing disk rarely recovers within a second, but
# exporters back off exponentially on their own anyway; this is only the first wait.
STORE_ERROR_RETRY_AFTER_S = 5.0


@dataclass(frozen=True, kw_only=True)
class Limits(SpanLimits):
    """Per-request size limits, and (from SpanLimits) what one span may hold.

    ``max_request_bytes`` bounds the body as sent (compressed, if it is) on HTTP, and the gRPC
    message, which grpc-core applies both before and after its own decompression.
    ``max_decompressed_bytes`` bounds an HTTP body after gzip decoding. A request over a size
    limit is refused whole; a span over a SpanLimits limit is rejected alone (partial success).
    """

    max_request_bytes: int = 16 * MiB
    max_decompressed_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        super().__post_init__()  # every field a positive int
        # grpc-core takes the limit as a C int.
        if self.max_request_bytes > 2**31 - 1:
            raise ValueError("Limits.max_request_bytes must be below 2 GiB")


def retryable_message(exc: Overloaded | StoreError, *, transport: str) -> str:
    """What a client refused for ``exc`` is told; also logged, quietly for back-pressure."""
    if isinstance(exc, Overloaded):
        message = f"overloaded: {short_message(exc)}"
        # Expected back-pressure, reported by the queue's owner: one line per refused export
        # would flood the log exactly when the process is busiest.
        logger.debug("%s export refused, retryable: %s", transport, message)
    else:
        message = f"storage failure: {short_message(exc)}"
        logger.warning("%s export refused, retryable: %s", transport, message)
    return message


def retry_after_s(exc: Overloaded | StoreError) -> int:
    """Whole seconds, at least 1, for HTTP Retry-After and gRPC RetryInfo."""
    delay = exc.retry_after_s if isinstance(exc, Overloaded) else STORE_ERROR_RETRY_AFTER_S
    if not math.isfinite(delay):
        delay = STORE_ERROR_RETRY_AFTER_S
    return max(1, math.ceil(delay))


# Error messages travel in the grpc-message header; clients commonly cap headers near 8 KiB.
MAX_MESSAGE_CHARS = 1024


def short_message(exc: BaseException) -> str:
    """``str(exc)`` cut to MAX_MESSAGE_CHARS: a message may quote the offending input."""
    message = str(exc)
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    suffix = " ...(truncated)"
    return message[: MAX_MESSAGE_CHARS - len(suffix)] + suffix


# Content-Encoding -> zlib wbits. "deflate" is the zlib format (RFC 9110), which is what the
# OTel exporters send for it.
WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


_INFLATE_STEP = 1 * MiB


class BoundedInflater:
    """Incremental gzip/deflate decoding that stops as soon as the output passes ``limit`` bytes.

    Fed chunk by chunk as the body arrives, so a bomb (a few hundred KiB that inflate to
    gigabytes) costs at most ``limit`` bytes of memory and is refused before it is all read.
    Concatenated streams (gzip members) are decoded in turn, as ``gzip -d`` does.
    """

    def __init__(self, encoding: str, *, limit: int) -> None:
        self._encoding = encoding
        self._wbits = WBITS[encoding]
        self._limit = limit
        self._inflater = zlib.decompressobj(wbits=self._wbits)
        self._out = bytearray()

    def feed(self, data: bytes) -> None:
        """Decode ``data``; raise PayloadTooLarge past the limit, InvalidPayload if malformed."""
        while True:
            inflater = self._inflater
            # One byte more than the room left is enough to know the limit is passed; in steps,
            # so that no temporary chunk as large as the limit sits beside _out.
            step = min(self._limit - len(self._out) + 1, _INFLATE_STEP)
            try:
                out = inflater.decompress(data, step)
            except zlib.error as exc:
                raise InvalidPayload(f"invalid {self._encoding} body: {exc}") from exc
            self._out += out
            if len(self._out) > self._limit:
                raise PayloadTooLarge(
                    f"{self._encoding} body inflates to more than {self._limit} bytes (the limit)"
                )
            data = inflater.unconsumed_tail
            if inflater.eof and inflater.unused_data:
                data = inflater.unused_data  # the next gzip member
                self._inflater = zlib.decompressobj(wbits=self._wbits)
            elif not data and len(out) < step:
                # All input consumed, and the output was not cut at ``step``: nothing pending.
                return

    def finish(self) -> bytes:
        """The decoded body; raise InvalidPayload if the stream was cut short (or empty)."""
        if not self._inflater.eof:
            raise InvalidPayload(f"invalid {self._encoding} body: truncated or empty stream")
        return bytes(self._out)
