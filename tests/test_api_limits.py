"""The API bounds what it reads and what it echoes (Reliability II, item 6), against a real
``outcomewatch serve`` process: a body over the limit is answered 413 before the server reads
past it, and a validation error quotes only a short excerpt of the offending input."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

from outcomewatch.api.app import MAX_BODY_BYTES, MAX_EXCERPT
from tests.processes import ServeProcess, serving

RESOLVE = "/api/v1/incidents/1/resolve"


def _read_response(sock: socket.socket, *, resets: bool = False) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the timeout);
    with ``resets``, a reset after some data ends it too."""
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        if not resets:
            raise
    return data


def _connect(server: ServeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.api), timeout=10)


def _short(echoed: object) -> bool:
    """An excerpt: a string of at most MAX_EXCERPT characters and "…", or a small value."""
    if isinstance(echoed, str):
        return len(echoed) <= MAX_EXCERPT + 1
    return len(json.dumps(echoed)) <= MAX_EXCERPT


def test_a_declared_300_mb_body_is_answered_413_after_sending_only_its_start(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as server, _connect(server) as sock:
        declared = 300 * 1024 * 1024
        head = (f"POST {RESOLVE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {declared}\r\n\r\n")
        sock.sendall(head.encode() + b'{"comment": "' + b"x" * 1024)
        response = _read_response(sock)  # the server answers and closes: it waits for no more
        assert response.startswith(b"HTTP/1.1 413 "), response[:200]
        assert b"over the limit of %d bytes" % MAX_BODY_BYTES in response
        assert server.client.get("/readyz").status_code == 200


def test_a_chunked_body_is_cut_off_with_413_once_it_passes_the_limit(tmp_path: Path) -> None:
    chunk = b"x" * 16384
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    with serving(tmp_path) as server, _connect(server) as sock:
        sock.sendall(f"POST {RESOLVE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        # Read while sending: the server closes after answering, and chunks still in flight
        # then reset the connection, which would discard an answer not read yet.
        answer: list[bytes] = []
        reader = threading.Thread(target=lambda: answer.append(_read_response(sock, resets=True)))
        reader.start()
        sent = 0
        # Send until the server answers; give up far past the limit (then it read too much).
        while sent < 64 * MAX_BODY_BYTES and reader.is_alive():
            try:
                sock.sendall(framed)
            except OSError:  # closed after answering
                break
            sent += len(chunk)
        reader.join(timeout=30)
        assert sent < 64 * MAX_BODY_BYTES, "the server kept reading past the limit"
        assert answer and answer[0].startswith(b"HTTP/1.1 413 "), answer[:1]


def test_a_validation_error_echoes_only_a_short_excerpt_of_the_input(tmp_path: Path) -> None:
    big = "y" * (MAX_BODY_BYTES - 1000)
    with serving(tmp_path) as server:
        for body in ({"comment": big}, {"comment": [big]}, {"actor": {"k": big}},
                     {f"unknown{i}": i for i in range(500)}):
            response = server.client.post(RESOLVE, content=json.dumps(body),
                                          headers={"Content-Type": "application/json"})
            assert response.status_code == 422, response.text[:300]
            assert len(response.content) < 20 * (MAX_EXCERPT + 300), len(response.content)
            errors = response.json()["detail"]
            assert errors and all(_short(e.get("input")) for e in errors)
        assert server.client.get("/readyz").status_code == 200
