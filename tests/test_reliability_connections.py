"""Connections cannot exhaust the server (Reliability II, item 5), against a real ``outcomewatch
serve`` process: a request head or body that does not arrive in time is answered 408 and
closed, a listener at its connection limit answers 503 with Retry-After and closes at once, the
other transports keep serving, and the refusals are logged once a second, not once each.

The limits are the hidden setting OUTCOMEWATCH_LISTENER_LIMITS, so the timeouts are fractions
of a second here; what is asserted is what the server answered, never how long it took.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import grpc
import httpx
import pytest

from outcomewatch.listeners import LIMITS_ENV, ConnectionLimits
from outcomewatch.lograte import RateLimit
from tests.processes import RawClient, ServeProcess, SignupTraces, serving, wait_for

PARTIAL_HEAD = b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _answer(sock: socket.socket) -> bytes:
    """What the server sends until it closes (b"" for a reset without an answer)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _export_over_http(server: ServeProcess, body: bytes) -> int:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http}", timeout=10) as client:
        return client.post("/v1/traces", content=body,
                           headers={"Content-Type": "application/x-protobuf"}).status_code


def test_a_request_head_that_never_completes_is_answered_408_and_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LIMITS_ENV, "header_timeout_s=0.3,body_timeout_s=0.3")
    exports = SignupTraces.build(2).exports
    with serving(tmp_path) as server:
        silent = _connect(server.http)  # connects and sends nothing
        partial = _connect(server.http)
        partial.sendall(PARTIAL_HEAD)
        stalled_body = _connect(server.http)
        stalled_body.sendall(PARTIAL_HEAD + b"Content-Length: 1000\r\n\r\n" + b"\0" * 10)
        for sock in (silent, partial, stalled_body):
            with sock:
                assert _answer(sock).startswith(b"HTTP/1.1 408 "), sock
        # A client trickling its head a byte at a time is cut off before it is done.
        trickle = _connect(server.http)
        head = PARTIAL_HEAD * 20
        stop = threading.Event()
        sent = 0
        with trickle:
            for byte in head:
                try:
                    trickle.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += 1
                stop.wait(0.02)  # the client's pace, not a wait for the server
            assert sent < len(head), "the server waited for the whole trickled head"
        assert _export_over_http(server, exports[0].body) == 200
        assert RawClient(server.grpc_endpoint).send(exports[1].body) == grpc.StatusCode.OK
        output = server.output()
    assert "did not arrive within 0.3s" in output
    assert "Traceback" not in output


def test_a_listener_at_its_connection_limit_refuses_new_ones_and_the_rest_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LIMITS_ENV, "header_timeout_s=120,max_connections=5")
    exports = SignupTraces.build(4).exports
    with serving(tmp_path) as server:
        holders = []
        for _ in range(5):
            holders.append(_connect(server.http))
            holders[-1].sendall(PARTIAL_HEAD)
        # The limit counts the connections the server has accepted; one more is refused.
        answers = []
        for _ in range(200):
            with _connect(server.http) as sock:
                answers.append(_answer(sock))
        assert all(a == b"" or a.startswith(b"HTTP/1.1 503 ") for a in answers)
        assert any(b"Retry-After: 1" in a for a in answers)
        assert RawClient(server.grpc_endpoint).send(exports[0].body) == grpc.StatusCode.OK
        assert server.client.get("/readyz").status_code == 200  # the API has its own limit
        for sock in holders:
            sock.close()
        wait_for(lambda: _export_over_http(server, exports[1].body) == 200,
                 "the listener to accept again once the held connections closed")
        output = server.output()
    logged = output.count("refused a connection")
    assert 1 <= logged < len(answers) / 2, logged  # rate-limited: one line per second, with a count


def test_limits_from_the_environment_are_checked() -> None:
    assert ConnectionLimits.from_env({}) == ConnectionLimits()
    assert ConnectionLimits.from_env({LIMITS_ENV: "max_connections=7"}).max_connections == 7
    with pytest.raises(ValueError, match="unknown limit 'max_conns'"):
        ConnectionLimits.from_env({LIMITS_ENV: "max_conns=7"})
    with pytest.raises(ValueError, match="must be > 0"):
        ConnectionLimits.from_env({LIMITS_ENV: "header_timeout_s=0"})


# -- the rate-limited log filter, alone (its clock driven by the test) ------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(
    message: str, *, level: int = logging.ERROR, exc: BaseException | None = None
) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("asyncio", level, __file__, 1, message, None, exc_info)


def test_repeats_of_one_kind_are_logged_once_a_second_on_one_line_with_a_count() -> None:
    clock = _Clock()
    limit = RateLimit(every_s=1.0, clock=clock)
    error = OSError(24, "Too many open files")
    message = "socket.accept() out of system resource\nsocket: <socket fd=%d>"
    first = _record(message % 7, exc=error)
    assert limit.filter(first) and first.exc_info is not None  # the first, as it is
    passed = [limit.filter(_record(message % fd, exc=error)) for fd in range(8, 15_008)]
    assert not any(passed)
    clock.now = 1.0
    summary = _record(message % 9, exc=error)
    assert limit.filter(summary)
    assert summary.getMessage() == ("socket.accept() out of system resource: OSError: [Errno 24] "
                                    "Too many open files (15000 more like this in the last 1.0s)")
    assert summary.exc_info is None


def test_other_kinds_and_info_records_are_not_held_back() -> None:
    limit = RateLimit(every_s=1.0, clock=_Clock())
    assert limit.filter(_record("database write failed: %s"))
    assert limit.filter(_record("refused a connection: %d open"))
    assert limit.filter(_record("database write failed: %s", level=logging.WARNING))
    assert all(limit.filter(_record("recovered", level=logging.INFO)) for _ in range(10))
    assert not limit.filter(_record("database write failed: %s"))
