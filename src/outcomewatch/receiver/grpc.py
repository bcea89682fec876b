"""OTLP/gRPC: ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` on grpc.aio.

The method is registered with a generic handler that receives raw bytes: grpc's own protobuf
deserializer would answer a malformed request with INTERNAL/UNKNOWN and no useful message, while
OTLP asks for INVALID_ARGUMENT saying what was wrong.

Sizes: ``grpc.max_receive_message_length`` is checked by grpc-core on the message as received
and again after its own gzip/deflate decompression, which it performs with a bounded output
(grpc 1.85, measured: a 380 KiB message inflating to 400 MB is refused with RESOURCE_EXHAUSTED
"Decompressed message larger than max" while the server's peak memory grows by ~2 MB).

With a token, an export must carry the metadata ``authorization: Bearer <token>``, else it is
refused with UNAUTHENTICATED before its message is decoded.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

# googleapis-common-protos ships .pyi files but no py.typed marker.
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)

from outcomewatch.errors import InvalidPayload, Overloaded, StoreError
from outcomewatch.receiver.auth import authorized, check_token
from outcomewatch.receiver.decode_pool import DecodePool
from outcomewatch.receiver.limits import (
    Limits,
    Sink,
    retry_after_s,
    retryable_message,
    short_message,
)

logger = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
METHOD = "Export"

# The OTel Python exporter reads the retry delay from this trailer; grpc-go based clients (the
# Collector's exporter) read it from the RetryInfo detail of grpc-status-details-bin.
RETRY_INFO_KEY = "google.rpc.retryinfo-bin"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class _Refusal:
    code: grpc.StatusCode
    message: str
    trailers: tuple[tuple[str, bytes], ...] = ()


def _retry_trailers(message: str, delay_s: int) -> tuple[tuple[str, bytes], ...]:
    retry_info = RetryInfo()
    retry_info.retry_delay.seconds = delay_s
    status = Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message=message)
    status.details.add().Pack(retry_info)
    return (
        (RETRY_INFO_KEY, retry_info.SerializeToString()),
        (STATUS_DETAILS_KEY, status.SerializeToString()),
    )


# What a refused request is counted as (outcomewatch_requests_refused_total{reason}).
_REASONS = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.INTERNAL: "internal",
}


class _TraceService:
    def __init__(
        self, sink: Sink, clock_ns: Callable[[], int], decoder: DecodePool, token: str | None,
        on_refused: Callable[[str], None],
    ) -> None:
        self._on_refused = on_refused
        self._sink = sink
        self._clock_ns = clock_ns
        self._decoder = decoder
        self._token = token

    async def export(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> ExportTraceServiceResponse:
        if self._token is not None and not _authorized(context, self._token):
            self._on_refused("unauthenticated")
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token: send the metadata 'authorization: Bearer <token>'",
            )
        # The refusal is decided inside _accept's try block but answered out here, so that the
        # exception context.abort() raises is never swallowed by the catch-all there.
        result = await self._accept(request)
        if isinstance(result, _Refusal):
            self._on_refused(_REASONS.get(result.code, "internal"))
            await context.abort(result.code, result.message, result.trailers)
            raise AssertionError("unreachable: context.abort() raises")
        return result

    async def _accept(self, request: bytes) -> ExportTraceServiceResponse | _Refusal:
        """Decode, hand to the sink, and build the response, or say why the export is refused."""
        try:
            batch = await self._decoder.decode(request, self._clock_ns())
            if len(batch):
                await self._sink(batch)
        except InvalidPayload as exc:
            return _Refusal(grpc.StatusCode.INVALID_ARGUMENT, short_message(exc))
        except (Overloaded, StoreError) as exc:
            # UNAVAILABLE for both: every OTLP exporter retries it, while RESOURCE_EXHAUSTED is
            # retried only when it carries RetryInfo, and not by all exporters.
            message = retryable_message(exc, transport="OTLP/gRPC")
            return _Refusal(
                grpc.StatusCode.UNAVAILABLE, message, _retry_trailers(message, retry_after_s(exc))
            )
        except Exception as exc:
            # A bug in a sink or in decoding must cost one request, never the server.
            logger.exception("unexpected error while accepting an OTLP/gRPC export")
            return _Refusal(
                grpc.StatusCode.INTERNAL,
                f"internal error ({type(exc).__name__}) while accepting spans; see the server log",
            )
        response = ExportTraceServiceResponse()
        if batch.rejected:
            response.partial_success.rejected_spans = batch.rejected
            response.partial_success.error_message = batch.rejection_message
        return response


def _authorized(context: grpc.aio.ServicerContext, token: str) -> bool:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":  # grpc lowercases metadata keys
            return isinstance(value, str) and authorized(value, token)
    return False


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"  # an IPv6 literal
    return f"{host}:{port}"


def _probe(host: str, port: int, address: str) -> None:
    """Raise OSError if ``host:port`` is taken, before grpc tries: its C core would first log
    a line of its own ("add_port.cc ... Failed to add port") that the person never asked for.
    A port taken between this probe and grpc's bind still fails, with that line."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # grpc reports the unresolvable name itself
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot bind the OTLP/gRPC receiver to {address}: "
                                         f"{exc.strerror}") from exc


async def start_grpc_receiver(
    sink: Sink,
    *,
    host: str,
    port: int,
    limits: Limits,
    clock_ns: Callable[[], int] = time.time_ns,
    token: str | None = None,
    tls: tuple[bytes, bytes] | None = None,
    on_refused: Callable[[str], None] = lambda reason: None,
    decoder: DecodePool | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start an OTLP/gRPC trace receiver on the running asyncio loop.

    Returns the started server (stop it with ``await server.stop(grace)``) and the port bound,
    which is a free one when ``port`` is 0. Raises OSError when the address cannot be bound,
    ValueError for a ``token`` no client could send. With a ``token``, exports without the
    metadata ``authorization: Bearer <token>`` are refused with UNAUTHENTICATED. Requests are
    decoded by ``decoder`` (default: in this process, within ``limits``).
    """
    check_token(token)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limits.max_request_bytes),
            # grpc sets SO_REUSEPORT by default on Linux: a second process on the same port
            # would then bind "successfully" and silently take half the traffic.
            ("grpc.so_reuseport", 0),
        ]
    )
    service = _TraceService(sink, clock_ns, decoder or DecodePool(0, limits), token, on_refused)
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.unary_unary_rpc_method_handler(
                service.export,
                request_deserializer=None,
                response_serializer=ExportTraceServiceResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    address = _address(host, port)
    _probe(host, port, address)
    try:
        if tls is None:
            bound_port = server.add_insecure_port(address)
        else:  # (private key PEM, certificate chain PEM)
            bound_port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    except RuntimeError as exc:  # what grpc raises when the bind fails
        await server.stop(None)
        raise OSError(f"cannot bind the OTLP/gRPC receiver to {address}: {exc}") from exc
    await server.start()
    logger.info("OTLP/gRPC receiver listening on %s", _address(host, bound_port))
    return server, int(bound_port)
