"""A decode worker (``python -m outcomewatch.receiver.decode_worker``), the other end of
receiver/decode_pool.py.

The protocol, on the worker's stdin and stdout (little-endian):

- in, once: ``FRAME`` (length) and the pickled SpanLimits; out: an empty ``FRAME`` (ready, after
  the imports, so the server knows the first export will not wait for them);
- in, per export: ``REQUEST`` (body length, received_ns) and the OTLP/protobuf body as received;
  out, in the same order: ``FRAME`` (length) and a pickled ``("ok", WireBatch)`` or
  ``("error", exception)`` (what ``decode_here`` raised, InvalidPayload for a bad request).

The worker leaves when its stdin ends: the server closed it (``DecodePool.close``, after the
exports it sent are answered) or the server is gone (``kill -9``, a crash: the kernel closes the
pipe). So no thread watches the parent. It ignores SIGINT and SIGTERM: a terminal's Ctrl-C or
systemd's SIGTERM to the whole unit reaches the workers too, and the server decides when they
stop, so they neither die mid-export nor print a KeyboardInterrupt traceback of their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import signal
import struct
import sys
from typing import BinaryIO

from outcomewatch import otlp
from outcomewatch.otlp import SpanBatch
from outcomewatch.otlp_limits import SpanLimits

FRAME = struct.Struct("<I")
REQUEST = struct.Struct("<IQ")
PIPE_BYTES = 1 << 20  # a whole export in the pipe at once (Linux's default pipe holds 64 KiB)


def decode_here(body: bytes, received_ns: int, limits: SpanLimits) -> SpanBatch:
    """Decode in the calling process."""
    return otlp.batch_from_request(otlp.parse_protobuf(body), received_ns=received_ns,
                                   limits=limits, body=body)


def reply(kind: str, value: object) -> bytes:
    """A reply frame's payload: ``(kind, value)`` pickled (an exception that does not pickle
    goes as a RuntimeError naming it)."""
    try:
        return pickle.dumps((kind, value), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an exception with arguments pickle cannot rebuild
        return pickle.dumps(("error", RuntimeError(f"{type(value).__name__}: {value}")))


def _read(stream: BinaryIO, n: int) -> bytes | None:
    """Exactly ``n`` bytes, or None at the end of the stream."""
    data = stream.read(n)
    return data if len(data) == n else None


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer requests until ``requests`` ends (the protocol above)."""
    header = _read(requests, FRAME.size)
    if header is None:
        return
    limits = pickle.loads(_read(requests, FRAME.unpack(header)[0]) or b"")
    assert isinstance(limits, SpanLimits)
    replies.write(FRAME.pack(0))
    replies.flush()
    while (header := _read(requests, REQUEST.size)) is not None:
        length, received_ns = REQUEST.unpack(header)
        body = _read(requests, length)
        if body is None:
            return
        try:
            payload = reply("ok", decode_here(body, received_ns, limits).to_wire())
        except Exception as exc:
            payload = reply("error", exc)
        replies.write(FRAME.pack(len(payload)))
        replies.write(payload)
        replies.flush()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The replies keep fd 1 to themselves: anything else printing (a warning, a library) goes
    # to stderr instead of into the protocol.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    for fd in (0, replies.fileno()):
        # Fewer, larger reads and writes on both sides; refused above pipe-max-size (or
        # not a pipe), and then the default does.
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
