"""Soak: steady load with periodic kill -9 and restart, then a check of what the database holds.

    .venv/bin/python bench/soak.py --minutes 2 [--rate 150] [--kill-every 20] [--mix heavy]
        [--disk-full 45 [--disk-full-at 150] [--disk-size 1024]]

Not run in CI. It starts ``outcomewatch serve`` (short --trace-idle, a short --retention so that
deletion happens within minutes, a webhook route to a local receiver), streams OTLP/gRPC exports
from several threads in one of the mixes of soak_mix.py (``signup``, the default: a trace that
passes, a broken trace that fails, a trace whose outcome comes in the next export, filler
spans; ``heavy``: bench_verdicts.py's rule-heavy traces, each opening two runs, one passing, one
failing), and kills the server with SIGKILL every --kill-every seconds (+-30%), restarting it on
the same file at once. Exports not acknowledged are sent again, as exporters do.

``--disk-full SECONDS`` (off by default; root only, as it mounts a tmpfs of --disk-size MiB for
the database file and its WAL): at --disk-full-at (default: half-way) the tmpfs is filled to
its last block for that long, then freed (soak_disk.py); no kill happens from the filling until
the server has recovered without a restart (/readyz 200 and an export acknowledged again), and
the time both took is printed.

At the end it stops the load, waits for the verdicts, reads the incidents' files through the
API, stops the server with SIGTERM and reads the file read-only (soak_checks.py: lost spans,
duplicated verdicts, failure counts, outbox rows, evidence-less failures), prints the figures
with the server's peak RSS and the file size over time, and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import http.server
import os
import random
import re
import shutil
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

import grpc
import httpx
import soak_disk
import soak_mix
from soak_checks import Run, api_evidence, first_sent, report
from soak_mix import Export, Mix

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Ledger:
    """What the client sent and what was acknowledged."""

    mix: Mix
    exports: list[Export] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    last_ack: float = 0.0  # time.monotonic() of the latest acknowledgement

    def new_export(self) -> int:
        with self.lock:
            self.exports.append(self.mix.build())
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

    def __init__(self, workdir: Path, db: Path, args: list[str], log: Path) -> None:
        self.workdir, self.db, self.args, self.log = workdir, db, args, log.open("ab")
        self.popen: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.endpoint = ""
        self.api = ""
        self.up = threading.Event()

    def start(self) -> float:
        grpc_port, http_port, api_port = _free_port(), _free_port(), _free_port()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "outcomewatch", "serve", "--rules",
             str(self.workdir / "rules.yaml"), "--db", str(self.db),
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

    def __init__(self, ledger: Ledger, server: Server, *, workers: int, rate: float) -> None:
        self.ledger, self.server = ledger, server
        self.retry: deque[int] = deque()
        self.generate = threading.Event()
        self.generate.set()
        self.stop = threading.Event()
        self.pause = workers / rate
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for thread in self.threads:
            thread.start()

    def _next(self) -> int | None:
        with self.ledger.lock:
            if self.retry:
                return self.retry.popleft()
        if self.generate.is_set():
            return self.ledger.new_export()
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
                self.ledger.last_ack = time.monotonic()
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


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--mix", choices=["signup", "heavy"], default="signup")
    parser.add_argument("--rate", type=float, default=150.0, help="new exports per second")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--fillers", type=int, default=20, help="signup: filler spans per export")
    parser.add_argument("--padding", type=int, default=400, help="signup: bytes per filler span")
    parser.add_argument("--traces", type=int, default=5,
                        help="heavy: traces of 10 spans per export")
    parser.add_argument("--kill-every", type=float, default=20.0,
                        help="seconds, +-30%%; 0: never (to watch the file size alone)")
    parser.add_argument("--disk-full", type=float, default=0.0,
                        help="seconds the database's disk is held full (root only); 0: never")
    parser.add_argument("--disk-full-at", type=float, default=None,
                        help="seconds into the soak the disk fills (default: half-way)")
    parser.add_argument("--disk-size", type=int, default=1024, help="MiB of the tmpfs")
    parser.add_argument("--trace-idle", default="1s")
    parser.add_argument("--retention", default="30s")
    parser.add_argument("--evidence-retention", default="60s")
    parser.add_argument("--retention-interval", default="5s")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    if args.disk_full:
        soak_disk.require_root()
    workdir = Path(tempfile.mkdtemp(prefix="outcomewatch-soak-"))
    disk = workdir / "disk"
    if args.disk_full:
        soak_disk.mount(disk, args.disk_size)
    else:
        disk.mkdir()
    try:
        failed = _soak(args, workdir, disk / "soak.duckdb")
    finally:
        if args.disk_full:
            soak_disk.unmount(disk)
    if not args.keep:
        shutil.rmtree(workdir)
    else:
        print(f"work directory kept: {workdir}")
    if failed:
        raise SystemExit(f"soak: checks failed: {', '.join(failed)}")


def _soak(args: argparse.Namespace, workdir: Path, db: Path) -> list[str]:
    mix = soak_mix.make(args.mix, fillers=args.fillers, padding=args.padding,
                        traces=args.traces)
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    (workdir / "rules.yaml").write_text(mix.rules)
    (workdir / "config.yaml").write_text(soak_mix.CONFIG.format(port=hook.server_address[1]))
    server = Server(workdir, db, [
        "--trace-idle", args.trace_idle, "--config", str(workdir / "config.yaml"),
        "--retention", args.retention, "--evidence-retention", args.evidence_retention,
        "--retention-interval", args.retention_interval, "--log-level", "warning"],
        workdir / "serve.log")

    ledger = Ledger(mix)
    startups = [server.start()]
    load = Load(ledger, server, workers=args.workers, rate=args.rate)
    began = time.monotonic()
    end = began + args.minutes * 60
    phase = None
    if args.disk_full:
        at = args.minutes * 30 if args.disk_full_at is None else args.disk_full_at

        def refusals() -> Counter[str]:
            with ledger.lock:
                return Counter(ledger.refusals)

        phase = soak_disk.DiskFullPhase(
            db.parent, began, began + at, args.disk_full, api=lambda: server.api,
            refusals=refusals, last_ack=lambda: ledger.last_ack)
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

    def sample() -> None:
        with ledger.lock:
            acked = sum(e.acked for e in ledger.exports)
        samples.append((time.monotonic() - began, _size(db),
                        _size(db.with_suffix(".duckdb.wal")), acked))

    try:
        while time.monotonic() < end or (phase is not None and phase.active):
            now = time.monotonic()
            max_rss = max(max_rss, server.rss_kib())
            if now >= next_sample:
                sample()
                next_sample = now + args.sample_every
            if phase is not None:
                phase.tick(now)
            if now >= next_kill and not (phase is not None and phase.active):
                deleted += deleted_now()
                server.kill9()
                kills += 1
                startups.append(server.start())
                next_kill = time.monotonic() + args.kill_every * random.uniform(0.7, 1.3)
            time.sleep(0.2)
    finally:
        if phase is not None:
            phase.close()

    # Stop making new exports; let every refused one through, then wait for the verdicts.
    load.generate.clear()
    drain_until = time.monotonic() + 120
    while load.unacked() and time.monotonic() < drain_until:
        time.sleep(0.1)
    load.join()
    with ledger.lock:
        acked_all = all(e.acked for e in ledger.exports)
    _settle(server.api, _seconds(args.trace_idle))
    deleted += deleted_now()
    max_rss = max(max_rss, server.rss_kib())
    stopped_at = time.monotonic()
    evidence_s = _seconds(args.evidence_retention)
    recent = {t for t, sent in first_sent(ledger.exports).items()
              if sent >= stopped_at - evidence_s + 2.0}
    api_checked, api_evidence_less = api_evidence(server.api, recent)
    exit_code = server.terminate()
    sample()
    hook.shutdown()

    run = Run(mix, ledger.exports, ledger.attempts, ledger.refusals, kills, startups,
              exit_code, acked_all, max_rss, samples, deleted, began, stopped_at,
              _seconds(args.retention), evidence_s, api_checked, api_evidence_less)
    if phase is not None:
        run.disk_summary = phase.summary()
        run.disk_failed = [] if phase.recovered else ["disk-full recovery"]
    return report(run, db, args)


def _settle(api: str, idle_s: float) -> None:
    """Wait (bounded) until no run is open, then for the failures being recorded."""
    wait_until = time.monotonic() + max(30.0, 10 * idle_s)
    while time.monotonic() < wait_until:
        page = httpx.get(f"{api}/api/v1/runs", params={"status": "open", "limit": 1},
                         timeout=10).json()
        if not page["runs"]:
            break
        time.sleep(0.2)
    time.sleep(3 * idle_s)


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d)", duration):
        total += int(number) * units[unit]
    return total


if __name__ == "__main__":
    main()
