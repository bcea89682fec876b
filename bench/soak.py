"""Soak: steady load with periodic kill -9 and restart, then a check of what the database holds.

    .venv/bin/python bench/soak.py --minutes 2 [--rate 150] [--kill-every 20]

Not run in CI. It starts ``outcomewatch serve`` (short --trace-idle, a short --retention so that
deletion happens within minutes, a webhook route to a local receiver), streams OTLP/gRPC exports
from several threads (each export: a trace that passes, a broken trace that fails, the trigger
of a trace whose outcome comes in a later export, filler spans), and kills the server with
SIGKILL every --kill-every seconds (+-30%), restarting it on the same file at once. Exports not
acknowledged are sent again, as exporters do. At the end it stops the load, waits for the
verdicts, stops the server with SIGTERM and reads the file read-only:

- every acknowledged span is stored (for traces younger than --retention, which may not have
  been deleted yet);
- every trace with a trigger has exactly one run, and it is closed;
- no failure is counted twice (incident_failures, incidents.failure_count), no outbox row is
  duplicated;

and prints them with the server's peak RSS and the database file size over time.
"""

from __future__ import annotations

import argparse
import http.server
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import grpc
import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RULES = """
rules:
  - name: signup-welcomed
    owner: growth
    route: growth-oncall
    trigger: {span: signup.completed}
    expect: [{span: welcome.sent}]
"""
MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _span(trace_id: bytes, name: str, parent: bytes = b"", padding: int = 0) -> Span:
    now = time.time_ns()
    span = Span(trace_id=trace_id, span_id=os.urandom(8), parent_span_id=parent, name=name,
                start_time_unix_nano=now, end_time_unix_nano=now + 1000,
                status=Status(code=Status.STATUS_CODE_OK))
    span.attributes.append(_kv("customer.id", f"c-{random.randrange(10_000)}"))
    if padding:
        span.attributes.append(_kv("payload", "x" * padding))
    return span


@dataclass
class Export:
    body: bytes
    spans: Counter[str]  # trace id -> spans of it in this export
    triggers: list[str]
    first_sent: float = 0.0
    acked: bool = False


@dataclass
class Ledger:
    """What the client sent and what was acknowledged."""

    exports: list[Export] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    pending_outcome: Span | None = None

    def new_export(self, fillers: int, padding: int) -> int:
        whole, broken, split = os.urandom(16), os.urandom(16), os.urandom(16)
        trigger = _span(whole, "signup.completed")
        spans = [_span(whole, "welcome.sent", trigger.span_id), trigger]
        spans += [_span(whole, "db.query", trigger.span_id, padding) for _ in range(fillers)]
        spans.append(_span(broken, "signup.completed"))
        split_trigger = _span(split, "signup.completed")
        spans.append(split_trigger)
        with self.lock:
            if self.pending_outcome is not None:
                spans.append(self.pending_outcome)
            self.pending_outcome = _span(split, "welcome.sent", split_trigger.span_id)
            resource = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
            resource.resource.attributes.append(_kv("service.name", "accounts"))
            body = ExportTraceServiceRequest(resource_spans=[resource]).SerializeToString()
            self.exports.append(Export(body, Counter(s.trace_id.hex() for s in spans),
                                       [whole.hex(), broken.hex(), split.hex()]))
            return len(self.exports) - 1


class Webhook(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        return


class Server:
    """The outcomewatch process, restarted on the same file after each kill."""

    def __init__(self, workdir: Path, args: list[str], log: Path) -> None:
        self.workdir, self.args, self.log = workdir, args, log.open("ab")
        self.popen: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.endpoint = ""
        self.api = ""
        self.up = threading.Event()

    def start(self) -> float:
        grpc_port, http_port, api_port = _free_port(), _free_port(), _free_port()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "outcomewatch", "serve", "--rules",
             str(self.workdir / "rules.yaml"), "--db", str(self.workdir / "soak.duckdb"),
             "--grpc", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}",
             "--api", f"127.0.0.1:{api_port}", *self.args],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.api = f"http://127.0.0.1:{api_port}"
        started = time.monotonic()
        while True:
            if self.popen.poll() is not None:
                raise SystemExit(f"outcomewatch serve exited with {self.popen.returncode}")
            try:
                if httpx.get(f"{self.api}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - started > 60:
                raise SystemExit("outcomewatch serve did not become healthy in 60 s")
            time.sleep(0.05)
        self.endpoint = f"127.0.0.1:{grpc_port}"
        self.generation += 1
        self.up.set()
        return time.monotonic() - started

    def kill9(self) -> None:
        self.up.clear()
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def terminate(self) -> int:
        self.up.clear()
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=120)

    def rss_kib(self) -> int:
        if self.popen is None or self.popen.poll() is not None:
            return 0
        try:
            status = Path(f"/proc/{self.popen.pid}/status").read_text()
        except OSError:
            return 0
        match = re.search(r"VmRSS:\s+(\d+)", status)
        return int(match.group(1)) if match else 0

    def metric(self, name: str) -> dict[str, float]:
        try:
            text = httpx.get(f"{self.api}/metrics", timeout=5).text
        except httpx.HTTPError:
            return {}
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(name):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values


class Load:
    """Worker threads: send new exports at a steady rate, and re-send refused ones."""

    def __init__(self, ledger: Ledger, server: Server, *, workers: int, rate: float,
                 fillers: int, padding: int) -> None:
        self.ledger, self.server = ledger, server
        self.retry: deque[int] = deque()
        self.generate = threading.Event()
        self.generate.set()
        self.stop = threading.Event()
        self.pause = workers / rate
        self.fillers, self.padding = fillers, padding
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for thread in self.threads:
            thread.start()

    def _next(self) -> int | None:
        with self.ledger.lock:
            if self.retry:
                return self.retry.popleft()
        if self.generate.is_set():
            return self.ledger.new_export(self.fillers, self.padding)
        return None

    def _work(self) -> None:
        generation, channel, export = 0, None, None
        while not self.stop.is_set():
            if not self.server.up.wait(0.5):
                continue
            if generation != self.server.generation:
                if channel is not None:
                    channel.close()
                generation = self.server.generation
                channel = grpc.insecure_channel(self.server.endpoint)
                export = channel.unary_unary(EXPORT, request_serializer=None,
                                             response_deserializer=None)
            index = self._next()
            if index is None:
                self.stop.wait(0.05)
                continue
            item = self.ledger.exports[index]
            item.first_sent = item.first_sent or time.monotonic()
            assert export is not None
            try:
                export(item.body, timeout=30)
            except grpc.RpcError as exc:
                with self.ledger.lock:
                    self.ledger.attempts += 1
                    self.ledger.refusals[exc.code().name] += 1
                    self.retry.append(index)
                self.stop.wait(0.1)
                continue
            with self.ledger.lock:
                self.ledger.attempts += 1
                item.acked = True
            self.stop.wait(self.pause * random.uniform(0.5, 1.5))
        if channel is not None:
            channel.close()

    def unacked(self) -> int:
        with self.ledger.lock:
            return len(self.retry)

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=150.0, help="new exports per second")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--fillers", type=int, default=20, help="filler spans per export")
    parser.add_argument("--padding", type=int, default=400, help="bytes per filler span")
    parser.add_argument("--kill-every", type=float, default=20.0,
                        help="seconds, +-30%%; 0: never (to watch the file size alone)")
    parser.add_argument("--trace-idle", default="1s")
    parser.add_argument("--retention", default="30s")
    parser.add_argument("--evidence-retention", default="60s")
    parser.add_argument("--retention-interval", default="5s")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="outcomewatch-soak-"))
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    (workdir / "rules.yaml").write_text(RULES)
    (workdir / "config.yaml").write_text(
        f"routes:\n  growth-oncall:\n    webhook: {{url: 'http://127.0.0.1:"
        f"{hook.server_address[1]}/hook'}}\n")
    db = workdir / "soak.duckdb"
    server = Server(workdir, [
        "--trace-idle", args.trace_idle, "--config", str(workdir / "config.yaml"),
        "--retention", args.retention, "--evidence-retention", args.evidence_retention,
        "--retention-interval", args.retention_interval, "--log-level", "warning"],
        workdir / "serve.log")
    retention_s = _seconds(args.retention)

    ledger = Ledger()
    startups = [server.start()]
    load = Load(ledger, server, workers=args.workers, rate=args.rate, fillers=args.fillers,
                padding=args.padding)
    began = time.monotonic()
    end = began + args.minutes * 60
    never = float("inf")
    next_kill = began + args.kill_every * random.uniform(0.7, 1.3) if args.kill_every else never
    next_sample = began
    kills = 0
    max_rss = 0
    deleted: Counter[str] = Counter()
    samples: list[tuple[float, int, int, int]] = []  # (t, db, wal, acked exports)

    def deleted_now() -> Counter[str]:
        values = server.metric("outcomewatch_spans_deleted_total")
        return Counter({k.split('"')[1]: int(v) for k, v in values.items() if '"' in k})

    while time.monotonic() < end:
        now = time.monotonic()
        max_rss = max(max_rss, server.rss_kib())
        if now >= next_sample:
            with ledger.lock:
                acked = sum(e.acked for e in ledger.exports)
            samples.append((now - began, _size(db), _size(db.with_suffix(".duckdb.wal")), acked))
            next_sample = now + args.sample_every
        if now >= next_kill:
            deleted += deleted_now()
            server.kill9()
            kills += 1
            startups.append(server.start())
            next_kill = time.monotonic() + args.kill_every * random.uniform(0.7, 1.3)
        time.sleep(0.2)

    # Stop making new exports; let every refused one through, then wait for the verdicts.
    load.generate.clear()
    drain_until = time.monotonic() + 120
    while load.unacked() and time.monotonic() < drain_until:
        time.sleep(0.1)
    load.join()
    with ledger.lock:
        acked_all = all(e.acked for e in ledger.exports)
    idle_s = _seconds(args.trace_idle)
    wait_until = time.monotonic() + max(30.0, 10 * idle_s)
    open_runs = -1
    while time.monotonic() < wait_until:
        page = httpx.get(f"{server.api}/api/v1/runs", params={"status": "open", "limit": 1},
                         timeout=10).json()
        open_runs = len(page["runs"])
        if open_runs == 0 and time.monotonic() - began > idle_s:
            break
        time.sleep(0.2)
    time.sleep(3 * idle_s)  # failures being recorded
    deleted += deleted_now()
    max_rss = max(max_rss, server.rss_kib())
    stopped_at = time.monotonic()
    exit_code = server.terminate()
    samples.append((time.monotonic() - began, _size(db), _size(db.with_suffix(".duckdb.wal")),
                    sum(e.acked for e in ledger.exports)))
    hook.shutdown()

    report(ledger, db, kills=kills, startups=startups, exit_code=exit_code,
           acked_all=acked_all, max_rss=max_rss, samples=samples, deleted=deleted,
           checkable_after=stopped_at - retention_s + 2.0, args=args)
    if not args.keep:
        for path in sorted(workdir.glob("*")):
            path.unlink()
        workdir.rmdir()
    else:
        print(f"work directory kept: {workdir}")


def report(ledger: Ledger, db: Path, *, kills: int, startups: list[float], exit_code: int,
           acked_all: bool, max_rss: int, samples: list[tuple[float, int, int, int]],
           deleted: Counter[str], checkable_after: float, args: argparse.Namespace) -> None:
    conn = duckdb.connect(str(db), read_only=True)
    try:
        stored = dict(conn.execute(
            "SELECT trace_id, count(DISTINCT span_id) FROM spans GROUP BY ALL").fetchall())
        runs = conn.execute("SELECT trace_id, status, count(*) FROM runs GROUP BY ALL").fetchall()
        failure_dupes = conn.execute(
            "SELECT count(*) FROM (SELECT run_id FROM incident_failures GROUP BY ALL "
            "HAVING count(*) > 1)").fetchone()
        failures = conn.execute("SELECT count(*) FROM incident_failures").fetchone()
        counted = conn.execute("SELECT count(*), coalesce(sum(failure_count), 0) "
                               "FROM incidents").fetchone()
        outbox_dupes = conn.execute(
            "SELECT count(*) FROM (SELECT incident_id, transition, target FROM outbox "
            "GROUP BY ALL HAVING count(*) > 1)").fetchone()
        total_spans = conn.execute("SELECT count(*) FROM spans").fetchone()
    finally:
        conn.close()
    assert failure_dupes and failures and counted and outbox_dupes and total_spans

    expected: Counter[str] = Counter()  # trace -> acked spans, for traces not yet expirable
    expirable: set[str] = set()
    triggers: set[str] = set()
    spans_acked = 0
    for export in ledger.exports:
        if not export.acked:
            continue
        spans_acked += sum(export.spans.values())
        triggers.update(export.triggers)
        for trace_id, count in export.spans.items():
            if export.first_sent < checkable_after:
                expirable.add(trace_id)
            expected[trace_id] += count
    checked = {t: n for t, n in expected.items() if t not in expirable}
    missing_spans = sum(max(0, n - stored.get(t, 0)) for t, n in checked.items())
    runs_per_trace: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    for trace_id, status, count in runs:
        runs_per_trace[trace_id] += count
        statuses[status] += count
    without_run = len(triggers - set(runs_per_trace))
    several = sum(1 for n in runs_per_trace.values() if n > 1)
    sent = len(ledger.exports)

    print(f"soak: {args.minutes:g} min at ~{args.rate:g} exports/s ({args.workers} threads), "
          f"kill -9 every ~{args.kill_every:g}s, trace idle {args.trace_idle}, retention "
          f"{args.retention} / evidence {args.evidence_retention} every "
          f"{args.retention_interval}")
    print(f"kills: {kills} (kill -9, restart on the same file); startups "
          f"{', '.join(f'{s:.1f}s' for s in startups)}; final SIGTERM exit code {exit_code}")
    print(f"exports: {sent} made, {ledger.attempts} attempts, refused attempts "
          f"{dict(ledger.refusals) or 0}, all acknowledged in the end: {acked_all}")
    print(f"spans: {spans_acked} acknowledged; {sum(checked.values())} in traces younger than "
          f"the retention checked, missing {missing_spans}; {total_spans[0]} rows stored")
    print(f"traces with a trigger: {len(triggers)}; runs {dict(statuses)}; traces without a "
          f"run: {without_run}; with more than one run: {several}")
    print(f"failures: {failures[0]} incident_failures rows, duplicated run ids "
          f"{failure_dupes[0]}; incidents {counted[0]} with failure_count sum {counted[1]} "
          f"(failed runs {statuses.get('failed', 0)}); duplicated outbox rows {outbox_dupes[0]}")
    print(f"retention deleted: {dict(deleted) or 0}")
    print(f"server RSS max: {max_rss / 1024:.0f} MiB")
    print("database file over time (t, file, wal, exports acked):")
    for t, size, wal, acked in samples:
        print(f"  {t:7.1f}s  {size / MiB:8.1f} MiB  wal {wal / MiB:7.1f} MiB  {acked:>8}")


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d)", duration):
        total += int(number) * units[unit]
    return total


if __name__ == "__main__":
    main()
