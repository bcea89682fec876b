"""TLS on all three listeners (--tls-cert/--tls-key) and the OTLP bearer token (--otlp-token),
with the official OTLP exporters and httpx as a user configures them, against a real process.
The certificate is self-signed for 127.0.0.1, made here with the ``cryptography`` package."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.trace.export import SpanExportResult

from tests.processes import ServeProcess, serving
from tests.spans import sdk_spans

TOKEN = "s3cr3t-otlp-token"
BEARER = {"authorization": f"Bearer {TOKEN}"}


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outcomewatch test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[ServeProcess, Path]]:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    with serving(tmp_path, trace_idle="1h", scheme="https", verify=context,
                 args=["--tls-cert", str(cert), "--tls-key", str(key),
                       "--otlp-token", TOKEN]) as server:
        yield server, cert


def _trace_id(spans: list) -> str:  # type: ignore[type-arg]
    return f"{spans[0].context.trace_id:032x}"


def test_official_exporters_send_over_tls_with_the_token_and_are_refused_without(
    tls_server: tuple[ServeProcess, Path], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, cert = tls_server
    # requests lets these variables override a Session's own CA file (psf/requests#3829), so
    # with them set the HTTP exporter would ignore certificate_file.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    credentials = grpc.ssl_channel_credentials(cert.read_bytes())
    grpc_endpoint = f"https://127.0.0.1:{server.grpc}"
    http_endpoint = f"https://127.0.0.1:{server.http}/v1/traces"

    exporters = {
        "grpc": GrpcSpanExporter(endpoint=grpc_endpoint, credentials=credentials,
                                 headers=BEARER, timeout=10),
        "http": HttpSpanExporter(endpoint=http_endpoint, certificate_file=str(cert),
                                 headers=BEARER, timeout=10),
        "grpc without token": GrpcSpanExporter(endpoint=grpc_endpoint, credentials=credentials,
                                               timeout=10),
        "http without token": HttpSpanExporter(endpoint=http_endpoint,
                                               certificate_file=str(cert), timeout=10),
    }
    traces: dict[str, str] = {}
    results: dict[str, SpanExportResult] = {}
    for name, exporter in exporters.items():
        spans = sdk_spans("accounts")
        traces[name] = _trace_id(spans)
        results[name] = exporter.export(spans)
        exporter.shutdown()
    assert results == {
        "grpc": SpanExportResult.SUCCESS, "http": SpanExportResult.SUCCESS,
        "grpc without token": SpanExportResult.FAILURE,
        "http without token": SpanExportResult.FAILURE,
    }
    refusals = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("UNAUTHENTICATED" in m for m in refusals), refusals
    assert any("401" in m for m in refusals), refusals

    # The API over TLS, verified against the same certificate.
    for name in ("grpc", "http"):
        trace = server.client.get(f"/api/v1/traces/{traces[name]}")
        assert trace.status_code == 200
        assert sorted(s["name"] for s in trace.json()["spans"]) == ["POST /orders", "charge"]
    for name in ("grpc without token", "http without token"):
        assert server.client.get(f"/api/v1/traces/{traces[name]}").status_code == 404


def test_the_refusals_say_unauthenticated_and_401_and_plain_text_is_refused(
    tls_server: tuple[ServeProcess, Path],
) -> None:
    server, cert = tls_server
    body = b""  # an empty export: refused for the token before its body is read
    channel = grpc.secure_channel(f"127.0.0.1:{server.grpc}",
                                  grpc.ssl_channel_credentials(cert.read_bytes()))
    export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                 request_serializer=None, response_deserializer=None)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            export(body, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        export(body, timeout=10, metadata=tuple(BEARER.items()))  # accepted with the token
    finally:
        channel.close()

    context = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(base_url=f"https://127.0.0.1:{server.http}", verify=context) as http:
        response = http.post("/v1/traces", content=body,
                             headers={"Content-Type": "application/x-protobuf"})
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
    # Plain HTTP to a TLS listener gets no answer it could mistake for success.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.api}/healthz", timeout=5).raise_for_status()
    # And a client that does not trust the certificate refuses the server.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://127.0.0.1:{server.api}/healthz", timeout=5)
