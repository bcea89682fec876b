"""OTLP/HTTP: ``POST /v1/traces`` as a Starlette app.

Bodies are binary protobuf (``application/x-protobuf``) or OTLP/JSON (``application/json``),
sent as is or with ``Content-Encoding: gzip`` (or ``deflate``). Responses are encoded like the
request, as the OTLP/HTTP spec asks: an ExportTraceServiceResponse on success, a
google.rpc.Status on error.

The body is read as a stream and decoded as it arrives, so an oversized body or a gzip bomb is
refused after at most ``max_request_bytes`` read and ``max_decompressed_bytes`` inflated. The
rest of a refused body is drained by the server (uvicorn), which keeps the connection usable
and lets the client read the answer.

With a token, a request must carry the header ``Authorization: Bearer <token>``, else it is
answered 401 with ``WWW-Authenticate: Bearer`` before its body is read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from outcomewatch import otlp
from outcomewatch.errors import InvalidPayload, Overloaded, PayloadTooLarge, StoreError
from outcomewatch.receiver.auth import authorized, check_token
from outcomewatch.receiver.decode_pool import DecodePool
from outcomewatch.receiver.limits import (
    WBITS,
    BoundedInflater,
    Limits,
    Sink,
    retry_after_s,
    retryable_message,
    short_message,
)
from outcomewatch.receiver.otlp_json import parse_json

logger = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"

# google.rpc.Code values, for the Status body of each error answer.
_INVALID_ARGUMENT, _RESOURCE_EXHAUSTED, _INTERNAL, _UNAVAILABLE = 3, 8, 13, 14
_UNAUTHENTICATED = 16


def _encode_json(message: Message) -> bytes:
    # Field names in lowerCamelCase, as OTLP/JSON wants; only ever used on tiny messages.
    return json_format.MessageToJson(message, indent=None).encode()


def _encode_protobuf(message: Message) -> bytes:
    return message.SerializeToString()


@dataclass(frozen=True)
class _Format:
    media_type: str
    parse: Callable[[bytes], ExportTraceServiceRequest]
    encode: Callable[[Message], bytes]

    def response(
        self, message: Message, status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> Response:
        return Response(self.encode(message), status_code, headers, media_type=self.media_type)

    def error(
        self,
        status_code: int,
        rpc_code: int,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        return self.response(Status(code=rpc_code, message=message), status_code, headers)


_FORMATS = {
    "application/x-protobuf": _Format(
        "application/x-protobuf", otlp.parse_protobuf, _encode_protobuf
    ),
    "application/json": _Format("application/json", parse_json, _encode_json),
}
_IDENTITY = ("", "identity")


async def _read_body(request: Request, encoding: str, limits: Limits) -> bytes:
    """The request body, decoded; raise PayloadTooLarge or InvalidPayload (bad gzip)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise PayloadTooLarge(
            f"body of {declared} bytes is over the limit of {limits.max_request_bytes} bytes"
        )
    inflater = (
        None
        if encoding in _IDENTITY
        else BoundedInflater(encoding, limit=limits.max_decompressed_bytes)
    )
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        # Counted as it arrives: a chunked body declares no length up front.
        if received > limits.max_request_bytes:
            raise PayloadTooLarge(f"body is over the limit of {limits.max_request_bytes} bytes")
        if inflater is None:
            chunks.append(chunk)
        else:
            inflater.feed(chunk)
    return b"".join(chunks) if inflater is None else inflater.finish()


def _unauthenticated(request: Request, fmt: _Format | None) -> Response:
    """401, in the request's format if it has one; says why in WWW-Authenticate (RFC 6750)."""
    given = request.headers.get("authorization") is not None
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"' if given else "Bearer"}
    message = "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'"
    if fmt is None:
        return PlainTextResponse(message, 401, headers)
    return fmt.error(401, _UNAUTHENTICATED, message, headers)


def create_http_receiver(
    sink: Sink,
    *,
    limits: Limits,
    clock_ns: Callable[[], int] = time.time_ns,
    token: str | None = None,
    on_refused: Callable[[str], None] = lambda reason: None,
    decoder: DecodePool | None = None,
) -> Starlette:
    """An ASGI app serving OTLP/HTTP ``POST /v1/traces``; every other path is a 404.

    200 once ``sink`` has returned (with partial_success when some spans were rejected); 400
    for a malformed request, 401 without the bearer ``token`` (when one is set), 413 over a
    size limit, 415 for an unsupported Content-Type or Content-Encoding, 503 with Retry-After
    when the sink raises Overloaded or StoreError. Raises ValueError for a ``token`` no client
    could send. Protobuf bodies are decoded by ``decoder`` (default: in this process, within
    ``limits``); JSON ones in this process.
    """
    check_token(token)
    decoder = decoder or DecodePool(0, limits)

    async def export_traces(request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        fmt = _FORMATS.get(content_type.partition(";")[0].strip().lower())
        if token is not None and not authorized(request.headers.get("authorization"), token):
            on_refused("unauthenticated")
            return _unauthenticated(request, fmt)
        if fmt is None:
            on_refused("invalid")
            # No Status body: there is no encoding this client is known to read.
            return PlainTextResponse(
                f"unsupported Content-Type {content_type!r}: send one of {', '.join(_FORMATS)}",
                415,
            )
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in _IDENTITY and encoding not in WBITS:
            on_refused("invalid")
            return fmt.error(
                415,
                _INVALID_ARGUMENT,
                f"unsupported Content-Encoding {encoding!r}: send gzip, deflate or identity",
            )
        try:
            body = await _read_body(request, encoding, limits)
            if fmt.parse is otlp.parse_protobuf:
                batch = await decoder.decode(body, clock_ns())
            else:
                batch = otlp.batch_from_request(fmt.parse(body), received_ns=clock_ns(),
                                                limits=limits)
            if len(batch):
                await sink(batch)
        except PayloadTooLarge as exc:
            on_refused("too_large")
            return fmt.error(413, _RESOURCE_EXHAUSTED, short_message(exc))
        except InvalidPayload as exc:
            on_refused("invalid")
            return fmt.error(400, _INVALID_ARGUMENT, short_message(exc))
        except (Overloaded, StoreError) as exc:
            on_refused("unavailable")
            return fmt.error(
                503,
                _UNAVAILABLE,
                retryable_message(exc, transport="OTLP/HTTP"),
                headers={"Retry-After": str(retry_after_s(exc))},
            )
        except ClientDisconnect:
            # The client went away mid-body: nobody will read this answer.
            return Response(status_code=400)
        except Exception as exc:
            # A bug in a sink or in decoding must cost one request and say so in the log.
            logger.exception("unexpected error while accepting an OTLP/HTTP export")
            on_refused("internal")
            return fmt.error(
                500,
                _INTERNAL,
                f"internal error ({type(exc).__name__}) while accepting spans; see the server log",
            )
        response = ExportTraceServiceResponse()
        if batch.rejected:
            response.partial_success.rejected_spans = batch.rejected
            response.partial_success.error_message = batch.rejection_message
        return fmt.response(response)

    app = Starlette(routes=[Route(TRACES_PATH, export_traces, methods=["POST"])])
    # "/v1/traces/" is a misconfigured endpoint: say so (404) rather than redirect the POST.
    app.router.redirect_slashes = False
    return app
