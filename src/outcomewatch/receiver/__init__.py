"""OTLP receivers (gRPC and HTTP): decode and validate export requests, enforce size limits,
and hand each batch of accepted spans to a sink; acknowledge only once the sink returns.

Imports only the leaves (otlp, errors, model): the sink is handed in, never imported.
"""

from outcomewatch.receiver.grpc import start_grpc_receiver
from outcomewatch.receiver.http import create_http_receiver
from outcomewatch.receiver.limits import Limits, Sink

__all__ = ["Limits", "Sink", "create_http_receiver", "start_grpc_receiver"]
