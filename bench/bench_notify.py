"""Notification benchmark: do new notifications still go out promptly while one target hangs?

    .venv/bin/python bench/bench_notify.py [--incidents 1000] [--seconds 30] [--interval 1]

A real DuckDB store (temporary file) gets ``--incidents`` open incidents, written through the
store's own failure path (so each has its outbox rows), spread evenly over three routes:

- ``hole``: an Alertmanager target that is a black hole (accepts connections, never answers;
  the default 10 s timeout),
- ``hooks``: a webhook target,
- ``pager``: an Alertmanager target (a local receiver speaking its v2 API).

The notifier (``run_forever`` at ``--interval``, re-sends every ``--resend``; with ``--wake``
woken after each commit, as the server would) starts on that backlog. Then, for ``--seconds``,
a new failure is written every 0.5 s on ``hooks`` and on ``pager`` alternately, and the time
from its commit to its arrival at the receiver is measured.

Printed: how long the two live routes took to drain the backlog, the new notifications' latency
(p50, p95, max) per route, the re-sends each live receiver got, the process RSS (start, after
the backlog, peak, end), and the notifier's WARNING lines per target against its backoff steps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from outcomewatch.clock import system_clock
from outcomewatch.config import load_config
from outcomewatch.incidents.notify import Notifier
from outcomewatch.jsonsafe import dumps
from outcomewatch.model import FailureReason, RunFailed
from outcomewatch.store.duckdb import Store
from outcomewatch.store.incidents import IncidentFacts

ROUTES = ("hole", "hooks", "pager")
TARGET = {"hole": "alertmanager", "hooks": "webhook", "pager": "alertmanager"}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Receivers:
    """The live routes' receivers (one uvicorn in a thread): arrival time per group value."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.requests: Counter[str] = Counter()
        self.resent_alerts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def app(self) -> Starlette:
        async def alerts(request: Request) -> JSONResponse:
            body = await request.json()
            now = time.monotonic()
            with self.lock:
                self.requests["pager"] += 1
                if len(body) > 1:
                    self.resent_alerts["pager"] += len(body)
                for alert in body:
                    self.arrived.setdefault(alert["labels"]["customer_id"], now)
            return JSONResponse({})

        async def hook(request: Request) -> JSONResponse:
            body = await request.json()
            now = time.monotonic()
            with self.lock:
                self.requests["hooks"] += 1
                self.arrived.setdefault(body["commonLabels"]["customer_id"], now)
            return JSONResponse({})

        return Starlette(routes=[Route("/api/v2/alerts", alerts, methods=["POST"]),
                                 Route("/hook", hook, methods=["POST"])])


def serve(app: Starlette) -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def black_hole() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            held.append(sock.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def fail(store: Store, n: int, route: str) -> None:
    now = datetime.now(UTC)
    group = (("customer.id", f"c-{n}"),)
    failure = RunFailed(
        run_id=f"run-{n}", rule=f"rule-{route}", trace_id=f"{n:032x}", trigger=None,
        opened_at=now, closed_at=now, reason=FailureReason.TRACE_IDLE, missing=("done",),
        first_received_ns=0, group=group,
    )
    facts = IncidentFacts(
        severity="critical", owner="bench", route=route, summary=f"customer c-{n}: done missing",
        group_key=dumps(dict(group), sort_keys=True), targets=(TARGET[route],),
    )
    await store.record_failure(failure, facts, {})


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def main(args: argparse.Namespace) -> None:
    receivers = Receivers()
    live = serve(receivers.app())
    hole = black_hole()
    workdir = Path(tempfile.mkdtemp(prefix="bench-notify-"))
    config_path = workdir / "outcomewatch.yaml"
    config_path.write_text(json.dumps({"routes": {
        "hole": {"alertmanager": {"url": hole, "resend_every": args.resend}},
        "hooks": {"webhook": {"url": f"{live}/hook"}},
        "pager": {"alertmanager": {"url": live, "resend_every": args.resend}},
    }}))
    config = load_config(config_path)
    store = Store(str(workdir / "bench.duckdb"))
    lines = Lines()
    logging.getLogger("outcomewatch.incidents.notify").addHandler(lines)
    rss = {"start": rss_mb()}

    await asyncio.gather(*(fail(store, n, ROUTES[n % 3]) for n in range(args.incidents)))
    backlog = {f"c-{n}" for n in range(args.incidents) if ROUTES[n % 3] != "hole"}
    peak = rss_mb()
    notifier = Notifier(store, config, clock=system_clock)
    started = time.monotonic()
    task = asyncio.create_task(
        notifier.run_forever(interval=timedelta(seconds=args.interval)))
    while not backlog <= receivers.arrived.keys():
        await asyncio.sleep(0.05)
        if time.monotonic() - started > 120:
            print("backlog not drained in 120 s", file=sys.stderr)
            break
    drained = time.monotonic() - started
    rss["after backlog"] = rss_mb()

    committed: dict[str, tuple[str, float]] = {}
    n = args.incidents
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        route = ("hooks", "pager")[n % 2]
        await fail(store, n, route)
        committed[f"c-{n}"] = (route, time.monotonic())
        if args.wake:
            notifier.wake()
        n += 1
        peak = max(peak, rss_mb())
        await asyncio.sleep(0.5)
    give_up = time.monotonic() + 15
    while not committed.keys() <= receivers.arrived.keys() and time.monotonic() < give_up:
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await notifier.aclose()
    rss["peak"], rss["end"] = max(peak, rss_mb()), rss_mb()
    store.close()

    print(f"{args.incidents} open incidents over 3 routes (hole = black hole); "
          f"poll interval {args.interval}s, resend_every {args.resend}, wake {args.wake}")
    print(f"backlog of the live routes ({len(backlog)} notifications) delivered in "
          f"{drained:.2f}s")
    for route in ("hooks", "pager"):
        waits = [receivers.arrived[key] - at for key, (r, at) in committed.items()
                 if r == route and key in receivers.arrived]
        lost = sum(1 for key, (r, _) in committed.items()
                   if r == route and key not in receivers.arrived)
        figures = (f"; latency p50 {percentile(waits, 50):.3f}s p95 "
                   f"{percentile(waits, 95):.3f}s max {max(waits):.3f}s") if waits else ""
        print(f"new on {route}: {len(waits)} delivered, {lost} not delivered{figures}")
    print(f"re-sent alerts received on pager: {receivers.resent_alerts['pager']} "
          f"in {receivers.requests['pager']} requests in all")
    print("RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    per_target = Counter(line.split(" failed (", 1)[0] for line in lines.lines
                         if " failed (" in line)
    print(f"notifier WARNING lines: {len(lines.lines)}; whole-target backoff steps logged: "
          + json.dumps(per_target))
    for line in lines.lines[:6]:
        print(f"  {line[:160]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--incidents", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--interval", type=float, default=1.0, help="notifier poll, seconds")
    parser.add_argument("--resend", default="10s", help="resend_every of the two Alertmanagers")
    parser.add_argument("--wake", action="store_true",
                        help="call Notifier.wake() after each new failure is committed")
    asyncio.run(main(parser.parse_args()))
