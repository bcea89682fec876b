"""Replay benchmark: how fast does ``outcomewatch replay`` get through stored spans?

    .venv/bin/python bench/bench_replay.py [--spans 1000000] [--db FILE] [--seed 7]

Builds a DuckDB file with the server's schema holding ``--spans`` stored spans (inserted through
Arrow, straight into the tables: building it through the server would measure ingest), writes
20 rules to a temporary directory (the 10 examples and 10 more), runs ``replay`` on the file and
prints the stored spans scanned per second (all stored spans / replay seconds), how many
candidate spans reached Python and how many idle touches, and the verdicts.

The data: one hour of traffic, traces of 4 to 16 spans, arriving in requests of about 500 spans
from interleaved traces (children first, the root last, a few seconds apart). About a third of
the traces tell some rule's story (a trigger, most of its outcomes); every other span is the
usual noise (HTTP handlers, queries, cache calls) with a unique request id. Span blobs are real
protobuf ``Span`` messages, encoded by hand here for speed (checked against protobuf once).
"""

from __future__ import annotations

import argparse
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from outcomewatch.offline.replay import queries, render_replay, replay
from outcomewatch.otlp_decode import resource_id
from outcomewatch.rules import load_rules
from outcomewatch.store.schema import DDL

ROOT = Path(__file__).resolve().parent.parent
S = 10**9
START_NS = 1_790_000_000 * S
HOUR_NS = 3600 * S
BATCH = 500
NOISE = ["GET /api/orders", "db.query", "redis.get", "http.client", "queue.publish",
         "render.template", "cache.lookup", "auth.check", "email.render", "payment.quote"]
SERVICES = ["api", "worker", "billing", "mailer", "svc-3", "svc-7"]

EXTRA_RULES = "rules:\n" + "".join(
    f"""  - name: svc{i}-completes
    trigger: {{span: "svc{i}.start", service: "svc-*"}}
    expect:
      - {{span: "svc{i}.step*", status: ok}}
      - {{span: "svc{i}.done", status: ok, duration: {{lt: 30s}}}}
""" + ("    within: 5m\n" if i % 2 else "")
    for i in range(10)
)

# Per story: (name, service, status code, attributes), trigger first.
Story = list[tuple[str, str, int, dict[str, object]]]
STORIES: list[Story] = [
    [("stripe.webhook", "billing", 1, {"event.type": "invoice.payment_failed"}),
     ("entitlement.updated", "api", 1, {}),
     ("email.delivered", "mailer", 0, {"email.template": "dunning"})],
    [("report.generate", "worker", 1, {"report.schedule": "daily", "report.delivery": "email"}),
     ("email.send", "mailer", 1, {}), ("email.delivered", "mailer", 1, {})],
    [("batch.process", "worker", 1, {"batch.size": 5}), ("result.validated", "worker", 1, {}),
     ("result.persisted", "worker", 1, {}), ("result.published", "worker", 1, {})],
    [("queue.consume", "worker", 1, {"task.type": "crm.contact_update"}),
     ("external.update", "worker", 1, {"http.response.status_code": 200}),
     ("state.reconciled", "worker", 1, {})],
    [("checkout.submit", "api", 1, {}), ("payment.charge", "billing", 1, {}),
     ("receipt.sent", "mailer", 1, {})],
    [("export.request", "api", 0, {"customer.id": "c1"}), ("export.delivered", "worker", 1, {})],
    [("billing.webhook", "billing", 1, {"event.type": "customer.subscription.created",
                                        "subscription.id": "sub_1"}),
     ("provisioning.job", "worker", 1, {"subscription.id": "sub_1"}),
     ("tenant.ready", "worker", 1, {"subscription.id": "sub_1"})],
]
NO_ATTRIBUTES: dict[str, object] = {}
STORIES += [[(f"svc{i}.start", "svc-3", 1, NO_ATTRIBUTES),
             (f"svc{i}.step1", "svc-3", 1, NO_ATTRIBUTES),
             (f"svc{i}.done", "svc-7", 1, NO_ATTRIBUTES)] for i in range(10)]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + varint(len(payload)) + payload


def key_value(key: str, value: object) -> bytes:
    if isinstance(value, int):
        any_value = b"\x18" + varint(value)  # int_value, field 3
    else:
        any_value = field(0x0A, str(value).encode())  # string_value, field 1
    return field(0x4A, field(0x0A, key.encode()) + field(0x12, any_value))  # attributes, f. 9


def encode_span(trace_id: bytes, span_id: bytes, parent: bytes, name: str, start: int, end: int,
                code: int, attributes: bytes) -> bytes:
    """A protobuf Span, fields in number order as protobuf writes them."""
    out = b"\x0a\x10" + trace_id + b"\x12\x08" + span_id
    if parent:
        out += b"\x22\x08" + parent
    out += field(0x2A, name.encode()) + b"\x30\x01"  # name, kind internal
    out += b"\x39" + struct.pack("<Q", start) + b"\x41" + struct.pack("<Q", end)
    out += attributes
    if code:
        out += field(0x7A, b"\x18" + bytes([code]))  # status{code}, field 15
    return out


def check_encoding() -> None:
    raw = encode_span(b"\x01" * 16, b"\x02" * 8, b"\x03" * 8, "x", 5, 9, 2,
                      key_value("a", "b") + key_value("n", 300))
    span = PbSpan.FromString(raw)
    assert span.SerializeToString() == raw
    assert (span.name, span.status.code, span.attributes[1].value.int_value) == ("x", 2, 300)


def resources() -> dict[str, tuple[bytes, int]]:
    found = {}
    for service in SERVICES:
        resource = Resource()
        resource.attributes.add(key="service.name").value.string_value = service
        resource.attributes.add(key="host.name").value.string_value = f"{service}-host-1"
        raw = resource.SerializeToString()
        found[service] = (raw, resource_id(raw))
    return found


def build(db_path: Path, total: int, rng: random.Random) -> None:
    by_service = resources()
    conn = duckdb.connect(str(db_path))
    conn.execute(DDL)
    conn.execute("INSERT INTO resources SELECT * FROM (VALUES "
                 + ", ".join("(?, ?)" for _ in by_service) + ")",
                 [v for raw, rid in by_service.values() for v in (rid, raw)])
    columns: dict[str, list[object]] = {name: [] for name in (
        "trace_id", "span_id", "parent_span_id", "name", "service", "scope", "kind", "start_ns",
        "end_ns", "status_code", "status_message", "received_ns", "span", "resource_id")}
    pending: list[tuple[int, tuple[object, ...]]] = []
    made = trace = 0
    last_received = 0
    while made < total:
        size = rng.randint(4, 16)
        trace_start = START_NS + made * HOUR_NS // total
        trace_id = rng.randbytes(16)
        root_id = rng.randbytes(8)
        story = rng.choice(STORIES) if rng.random() < 0.35 else []
        story = [s for k, s in enumerate(story) if k == 0 or rng.random() < 0.85]
        for k in range(min(size, total - made)):
            is_root = k == 0
            if k < len(story):
                name, service, code, attributes = story[k]
            else:
                name, service, code, attributes = rng.choice(NOISE), rng.choice(SERVICES), 0, {}
            start = trace_start + k * 50_000_000
            end = start + rng.randint(1, 5_000) * 1_000_000
            arrival = end + (rng.randint(2, 8) * S if is_root else rng.randint(0, 2_000) * 10**6)
            encoded = b"".join(key_value(a, v) for a, v in attributes.items())
            encoded += key_value("request.id", rng.randbytes(8).hex())
            span_id = root_id if is_root else rng.randbytes(8)
            raw = encode_span(trace_id, span_id, b"" if is_root else root_id, name, start, end,
                              code, encoded)
            pending.append((arrival, (trace_id.hex(), span_id.hex(),
                                      "" if is_root else root_id.hex(), name, service, "bench",
                                      1, start, end, code, "", raw, by_service[service][1])))
        made += size
        trace += 1
        if len(pending) >= 200_000 or made >= total:
            pending.sort(key=lambda p: p[0])
            keep = pending if made >= total else pending[: len(pending) // 2]
            pending = [] if made >= total else pending[len(pending) // 2:]
            for b in range(0, len(keep), BATCH):
                chunk = keep[b:b + BATCH]
                received = max(chunk[-1][0], last_received + 1)
                last_received = received
                for _, row in chunk:
                    for name, value in zip(columns, (*row[:11], received, *row[11:]),
                                           strict=True):
                        columns[name].append(value)
            flush(conn, columns)
    conn.execute("CHECKPOINT")
    conn.close()
    print(f"built {made} spans in {trace} traces", file=sys.stderr)


def flush(conn: duckdb.DuckDBPyConnection, columns: dict[str, list[object]]) -> None:
    types = {"kind": pa.int8(), "status_code": pa.int8(), "start_ns": pa.int64(),
             "end_ns": pa.int64(), "received_ns": pa.int64(), "resource_id": pa.int64(),
             "span": pa.binary()}
    table = pa.table({name: pa.array(values, type=types.get(name, pa.string()))
                      for name, values in columns.items()})
    conn.register("incoming", table)
    conn.execute("INSERT INTO spans SELECT * FROM incoming")
    conn.unregister("incoming")
    for values in columns.values():
        values.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=1_000_000)
    parser.add_argument("--db", help="reuse (or keep) this DuckDB file")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    check_encoding()
    scratch = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    try:
        rules_dir = scratch / "rules"
        rules_dir.mkdir()
        for example in sorted((ROOT / "rules" / "examples").glob("*.yaml")):
            shutil.copy(example, rules_dir / example.name)
        (rules_dir / "extra.yaml").write_text(EXTRA_RULES)
        rules = load_rules([rules_dir])
        assert len(rules) == 20, len(rules)
        db_path = Path(args.db) if args.db else scratch / "spans.duckdb"
        if not db_path.exists():
            started = time.perf_counter()
            build(db_path, args.spans, random.Random(args.seed))
            print(f"built in {time.perf_counter() - started:.1f}s", file=sys.stderr)

        conn = duckdb.connect(str(db_path), read_only=True)
        candidates_sql, touches_sql, params = queries(rules, with_template=False)
        started = time.perf_counter()
        (candidates,) = conn.execute(f"SELECT count(*) FROM ({candidates_sql})",
                                     [-(2**63), *params]).fetchone() or (0,)
        sql_candidates = time.perf_counter() - started
        started = time.perf_counter()
        (touches,) = conn.execute(f"SELECT count(*) FROM ({touches_sql})",
                                  [*params, -(2**63)]).fetchone() or (0,)
        sql_touches = time.perf_counter() - started
        conn.close()

        report = replay(rules, str(db_path))
        stats = report.stats
        print(render_replay(report, "text"))
        print()
        print(f"stored spans scanned:     {stats.stored_spans}")
        print(f"replay seconds:           {stats.seconds:.2f}")
        print(f"spans/s scanned:          {stats.stored_spans / stats.seconds:,.0f}")
        print(f"candidate spans decoded:  {stats.candidate_spans} "
              f"({100 * stats.candidate_spans / max(stats.stored_spans, 1):.1f}% of stored)")
        print(f"idle touches:             {stats.touch_rows}")
        print(f"requests replayed:        {stats.requests}")
        print(f"SQL alone (count only):   candidates {candidates} in {sql_candidates:.2f}s, "
              f"touches {touches} in {sql_touches:.2f}s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
