"""Verdict benchmark: ingest speed, verdict throughput and latency, and verdict bookkeeping of a
running outcomewatch under three traffic mixes; then trace lookup among millions of stored
spans and the server's memory per live trace (acceptance of "One verdict path at ingest speed").

    .venv/bin/python bench/bench_verdicts.py [--seconds 20] [--mix quiet --mix heavy ...]
        [--lookup-spans 5000000] [--live-traces 20000] [--trace-idle 1s] [--profile DIR]

Every phase starts its own ``outcomewatch serve`` process (fresh DuckDB file, the rules of
bench/rules/, loopback ports picked by the OS) and sends pre-serialised OTLP/gRPC requests as
bench_ingest.py does: 500 spans per request in traces of 10, 8 calls in flight, every trace id
fresh. Mixes:

- quiet: no span matches a rule;
- typical: 1 trace in 10 opens a run (bench-typical), half of those pass, half fail at idle;
- heavy: every trace opens two runs (bench-heavy-pass passes, bench-heavy-fail fails at idle).

For each: sustained acknowledged spans/s and its ratio to the bare ParseFromString rate of the
same requests measured in the same run, refused exports by gRPC status, runs decided per second
of load (``closed_at`` inside the load window), and from each acknowledged trigger trace's
acknowledgement to its run's ``closed_at`` (the server's clock; same host) p50/p99 for failed
and passed runs. After the load it waits (bounded, --drain-timeout) for every verdict, then
checks through the API that every acknowledged trigger has exactly one closed run with the
expected status and that the sum of the rule's incidents' failure_count equals its failed runs
(no rule has open_after), printing OK or the discrepancies.

lookup: --lookup-spans quiet spans loaded (bounded by --lookup-max-seconds), then
``GET /api/v1/traces/{id}`` of 200 random stored traces, one after another: median and p95.
live: RSS after --live-traces quiet traces (decided and gone), then after as many traces held
live by bench-live (``within: 1h``): the difference per live trace.

--profile DIR runs ``py-spy record --format raw`` on the server during each mix's load
(DIR/<mix>.txt, collapsed stacks; summarise with bench/pyspy_top.py). Profiled figures are
slower: quote figures of a run without it. Figures vary +-30% between runs on small VMs.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from otlp_load import QUIET, LoadResult, ServeProcess, TraceShape, Workload, parse_rate, push
from otlp_load import workload as make_workload

from outcomewatch.durations import parse_duration

RULES = Path(__file__).resolve().parent / "rules"
TYPICAL_PASS = TraceShape("typical-pass", "bench.typical.start", ("bench.typical.done",))
TYPICAL_FAIL = TraceShape("typical-fail", "bench.typical.start")
HEAVY = TraceShape("heavy", "bench.heavy.start", ("bench.heavy.done",))
LIVE = TraceShape("live", "bench.live.start")
BENCH_RULES = ["bench-typical", "bench-heavy-pass", "bench-heavy-fail", "bench-live"]


def _typical(g: int) -> TraceShape:
    if g % 10:
        return QUIET
    return TYPICAL_PASS if (g // 10) % 2 == 0 else TYPICAL_FAIL


@dataclass(frozen=True)
class Mix:
    shape_of: Callable[[int], TraceShape]
    expected: dict[str, dict[str, str]]  # rule -> trace shape kind -> expected run status


MIXES = {
    "quiet": Mix(lambda g: QUIET, {}),
    "typical": Mix(_typical, {"bench-typical": {"typical-pass": "passed",
                                                "typical-fail": "failed"}}),
    "heavy": Mix(lambda g: HEAVY, {"bench-heavy-pass": {"heavy": "passed"},
                                   "bench-heavy-fail": {"heavy": "failed"}}),
}


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _pages(client: httpx.Client, path: str, key: str, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, "limit": 1000, **({"cursor": cursor} if cursor else {})}
        response = client.get(path, params=query)
        response.raise_for_status()
        body = response.json()
        rows += body[key]
        cursor = body.get("next_cursor")
        if not cursor:
            return rows


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _pair_ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{_quantile(values, 0.5) * 1000:,.0f}/{_quantile(values, 0.99) * 1000:,.0f}"


@dataclass
class MixRow:
    name: str
    parse: float
    acked: float
    refused: dict[str, int]
    runs_per_s: float
    failed_latency: list[float]
    passed_latency: list[float]
    visible_latency: list[float]
    counts: str

    def line(self) -> str:
        refused = sum(self.refused.values())
        refused_text = f"{refused:,}" + (
            f" {'/'.join(sorted(self.refused))}" if refused else "")
        return (f"{self.name:<8} {self.parse:>10,.0f} {self.acked:>9,.0f} "
                f"{self.acked / self.parse:>6.4f} {refused_text:>15} {self.runs_per_s:>7,.0f} "
                f"{_pair_ms(self.failed_latency):>13} {_pair_ms(self.passed_latency):>13} "
                f"{_pair_ms(self.visible_latency):>13} {len(self.visible_latency):>4}  "
                f"{self.counts}")


HEADER = (f"{'mix':<8} {'parse/s':>10} {'acked/s':>9} {'ratio':>6} {'refused':>15} "
          f"{'runs/s':>7} {'fail p50/p99':>13} {'pass p50/p99':>13} {'seen p50/p99':>13} "
          f"{'n':>4}  counts (API)")


def _expected_runs(load: Workload, result: LoadResult,
                   mix: Mix) -> dict[str, dict[str, tuple[str, float]]]:
    """rule -> trace id -> (expected status, send time) of acknowledged triggers."""
    expected: dict[str, dict[str, tuple[str, float]]] = {rule: {} for rule in mix.expected}
    for n, sent, _ in result.acked:
        for trace_id, shape in load.traces(n):
            for rule, kinds in mix.expected.items():
                if shape.kind in kinds:
                    expected[rule][trace_id] = (kinds[shape.kind], sent)
    return expected


def _drain(client: httpx.Client, expected: dict[str, dict[str, tuple[str, float]]],
           timeout: float) -> tuple[dict[str, list[dict[str, Any]]], bool]:
    """Every bench rule's runs once none is open and every expected trigger has a closed run,
    or as they are at ``timeout``; and whether that state was reached."""
    deadline = time.monotonic() + timeout
    while True:
        open_left = any(client.get("/api/v1/runs", params={"rule": rule, "status": "open",
                                                           "limit": 1}).json()["runs"]
                        for rule in BENCH_RULES)
        if not open_left or time.monotonic() > deadline:
            runs = {rule: _pages(client, "/api/v1/runs", "runs", rule=rule)
                    for rule in BENCH_RULES}
            closed = {rule: {r["trace_id"] for r in rows if r["status"] != "open"}
                      for rule, rows in runs.items()}
            if all(set(traces) <= closed[rule] for rule, traces in expected.items()):
                return runs, not open_left
            if time.monotonic() > deadline:
                return runs, False
        time.sleep(0.2)


def _check(client: httpx.Client, expected: dict[str, dict[str, tuple[str, float]]],
           runs: dict[str, list[dict[str, Any]]], drained: bool) -> str:
    problems: list[str] = [] if drained else ["drain timed out"]
    for rule in BENCH_RULES:
        rows = runs[rule]
        want = expected.get(rule, {})
        per_trace = Counter(r["trace_id"] for r in rows)
        missing = sum(1 for t in want if t not in per_trace)
        duplicated = sum(1 for t, count in per_trace.items() if count > 1)
        still_open = sum(1 for r in rows if r["status"] == "open")
        wrong = sum(1 for r in rows if r["trace_id"] in want and r["status"] != "open"
                    and r["status"] != want[r["trace_id"]][0])
        unacked = sum(1 for t in per_trace if t not in want)
        failed = [r for r in rows if r["status"] == "failed"]
        counted = sum(i["failure_count"] for i in _pages(client, "/api/v1/incidents",
                                                         "incidents", rule=rule))
        no_incident = sum(1 for r in failed if r["incident_id"] is None)
        for label, value in [("missing", missing), ("duplicated", duplicated),
                             ("open", still_open), ("wrong status", wrong),
                             ("no incident", no_incident)]:
            if value:
                problems.append(f"{rule}: {value} {label}")
        if unacked and rule in expected:  # exports that timed out but were stored: not an error
            problems.append(f"{rule}: {unacked} runs of unacknowledged exports (info)")
        elif unacked:
            problems.append(f"{rule}: {unacked} unexpected runs")
        if counted != len(failed):
            problems.append(f"{rule}: incidents count {counted} failures, {len(failed)} failed")
    return "OK" if not problems or all(p.endswith("(info)") for p in problems) else (
        "; ".join(problems))


class VisibleSampler:
    """Polls the API (every 50 ms) for a sample of failing trigger traces until all their runs
    are closed: from the send of the trace's last span to its verdict being readable, which
    includes the writer's backlog that ``closed_at`` (the engine's decision time) does not.
    At most one trace per second of load and 4 watched at a time, so that the polling costs
    the server little; and after one look at once, a trace is polled again only from 90% of
    ``idle`` (--trace-idle) after its send: a verdict that waits for the trace to go idle
    cannot be readable before, and polling it for nothing took 13% of the server's samples in
    the typical mix."""

    def __init__(self, load: Workload, mix: Mix, timeout: float, idle: float) -> None:
        self.load, self.mix, self.timeout, self.idle = load, mix, timeout, idle
        self.latencies: list[float] = []
        self.unseen = 0
        self._next_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    async def run(self, server: ServeProcess, load: Workload,
                  args: argparse.Namespace) -> LoadResult:
        async with httpx.AsyncClient(base_url=server.api, timeout=60) as self._client:
            result = await push(server.endpoint, load, seconds=args.seconds,
                                in_flight=args.in_flight, on_ack=self.on_ack)
            await asyncio.gather(*self._tasks)
        return result

    def on_ack(self, n: int, sent: float) -> None:
        if time.monotonic() < self._next_at or sum(not t.done() for t in self._tasks) >= 4:
            return
        for trace_id, shape in self.load.traces(n):
            rules = [r for r, kinds in self.mix.expected.items() if shape.kind in kinds]
            if any(self.mix.expected[r][shape.kind] == "failed" for r in rules):
                self._next_at = time.monotonic() + 1.0
                self._tasks.append(asyncio.create_task(self._watch(trace_id, sent, len(rules))))
                return

    async def _watch(self, trace_id: str, sent: float, runs: int) -> None:
        assert self._client is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                response = await self._client.get("/api/v1/runs",
                                                  params={"trace_id": trace_id})
            except httpx.TransportError:  # an API call slower than 60 s: keep polling
                continue
            if response.status_code == 200 and sum(
                    1 for r in response.json()["runs"] if r["status"] != "open") >= runs:
                self.latencies.append(time.time() - sent)
                return
            await asyncio.sleep(max(0.05, sent + 0.9 * self.idle - time.time()))
        self.unseen += 1


def _profiler(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen([str(py_spy), "record", "--pid", str(pid), "--format", "raw",
                             "--threads", "--nonblocking", "--rate", "100",
                             "--duration", str(max(1, int(seconds))), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_mix(name: str, args: argparse.Namespace) -> MixRow:
    mix = MIXES[name]
    load = make_workload(mix.shape_of, spans=args.spans, templates=8, seed=11)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        server = ServeProcess(Path(tmp), RULES, args.trace_idle)
        try:
            server.wait_healthy()
            parse = parse_rate(load, args.parse_seconds)
            profiler = (_profiler(server.pid, args.profile / f"{name}.txt", args.seconds)
                        if args.profile else None)
            _progress(f"{name}: load for {args.seconds:g} s")
            sampler = VisibleSampler(load, mix, args.drain_timeout,
                                     parse_duration(args.trace_idle).total_seconds())
            result = asyncio.run(sampler.run(server, load, args))
            if profiler:
                profiler.wait(timeout=60)
            expected = _expected_runs(load, result, mix)
            _progress(f"{name}: waiting for {sum(map(len, expected.values())):,} verdicts")
            with httpx.Client(base_url=server.api, timeout=120) as client:
                runs, drained = _drain(client, expected, args.drain_timeout)
                counts = _check(client, expected, runs, drained)
            if sampler.unseen:
                counts += f"; {sampler.unseen} sampled verdicts never readable"
            _progress(f"{name}: checked, stopping the server")
        finally:
            server.stop()
            _progress(f"{name}: stopped")
    window = (result.started, result.started + result.seconds)
    decided = sum(1 for rows in runs.values() for r in rows
                  if r["closed_at"] and window[0] <= _ts(r["closed_at"]) <= window[1])
    latency: dict[str, list[float]] = {"passed": [], "failed": []}
    for rule, traces in expected.items():
        for r in runs[rule]:
            if r["trace_id"] in traces and r["status"] in latency and r["closed_at"]:
                latency[r["status"]].append(_ts(r["closed_at"]) - traces[r["trace_id"]][1])
    return MixRow(name, parse, result.rate(load.spans_per_request), result.refused,
                  decided / result.seconds, latency["failed"], latency["passed"],
                  sampler.latencies, counts)


def _fresh_get(api: str, path: str) -> float:
    """Seconds for one GET on a new connection. Measured beside the keep-alive figure because
    the server answers a second request on a connection ~40 ms late (a Nagle / delayed-ACK
    signature; a new connection's first request is not delayed), which would hide the query."""
    host, port = api.removeprefix("http://").rsplit(":", 1)
    started = time.perf_counter()
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("GET", path)
        connection.getresponse().read()
    finally:
        connection.close()
    return time.perf_counter() - started


def run_lookup(args: argparse.Namespace) -> str:
    load = make_workload(lambda g: QUIET, spans=args.spans, templates=8, seed=13)
    with tempfile.TemporaryDirectory(prefix="bench-lookup-") as tmp:
        server = ServeProcess(Path(tmp), RULES, args.trace_idle)
        try:
            server.wait_healthy()
            parse = parse_rate(load, args.parse_seconds)
            _progress(f"lookup: loading {args.lookup_spans:,} spans")
            result = asyncio.run(push(server.endpoint, load, seconds=args.lookup_max_seconds,
                                      in_flight=args.in_flight, max_spans=args.lookup_spans))
            stored = len(result.acked) * load.spans_per_request
            rng = random.Random(5)
            per = load.traces_per_request
            picks = rng.sample(range(len(result.acked) * per), min(200, len(result.acked) * per))
            sample = [load.trace_id(result.acked[k // per][0], k % per).hex() for k in picks]
            times, fresh, wrong = [], [], 0
            with httpx.Client(base_url=server.api, timeout=60) as client:
                client.get(f"/api/v1/traces/{sample[0]}")  # connection and first-query warm-up
                for trace_id in sample:
                    started = time.perf_counter()
                    response = client.get(f"/api/v1/traces/{trace_id}")
                    times.append(time.perf_counter() - started)
                    if response.status_code != 200 or len(response.json()["spans"]) != 10:
                        wrong += 1
                    fresh.append(_fresh_get(server.api, f"/api/v1/traces/{trace_id}"))
        finally:
            server.stop()
    check = "OK" if not wrong else f"{wrong} traces not found whole"
    rate = result.rate(load.spans_per_request)
    return (f"lookup   GET /api/v1/traces/{{id}}, {len(sample)} random traces among {stored:,} "
            f"stored spans: median {statistics.median(times) * 1000:.1f} ms, "
            f"p95 {_quantile(times, 0.95) * 1000:.1f} ms on one keep-alive connection; "
            f"{statistics.median(fresh) * 1000:.1f} / {_quantile(fresh, 0.95) * 1000:.1f} ms "
            f"on a new connection each; {check} (loaded at "
            f"{rate:,.0f} spans/s = {rate / parse:.4f} "
            f"of parse, {sum(result.refused.values()):,} refused)")


def _live_traces(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("outcomewatch_live_traces "):
            return float(line.split()[1])
    raise RuntimeError("no outcomewatch_live_traces in /metrics")


def _wait_live(client: httpx.Client, done: Callable[[float], bool], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        live = _live_traces(client)
        if done(live) or time.monotonic() > deadline:
            return live
        time.sleep(0.2)


def run_live(args: argparse.Namespace) -> str:
    spans = args.live_traces * 10
    quiet = make_workload(lambda g: QUIET, spans=args.spans, templates=8, seed=17)
    live = make_workload(lambda g: LIVE, spans=args.spans, templates=8, seed=19)
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        server = ServeProcess(Path(tmp), RULES, args.trace_idle)
        try:
            server.wait_healthy()
            with httpx.Client(base_url=server.api, timeout=60) as client:
                _progress(f"live: {args.live_traces:,} quiet traces, then as many live ones")
                # The same number of spans first, none held: DuckDB's and the allocator's
                # growth from storing them is in the baseline, not in the per-trace figure.
                asyncio.run(push(server.endpoint, quiet, seconds=120,
                                 in_flight=args.in_flight, max_spans=spans))
                _wait_live(client, lambda n: n == 0, 30)
                before = server.rss_bytes()
                result = asyncio.run(push(server.endpoint, live, seconds=120,
                                          in_flight=args.in_flight, max_spans=spans))
                sent = len(result.acked) * live.traces_per_request
                held = _wait_live(client, lambda n: n >= sent, 60)
                after = server.rss_bytes()
        finally:
            server.stop()
    per_trace = (after - before) / held if held else float("nan")
    return (f"live     RSS per live trace: {per_trace / 1024:.2f} KiB ({held:,.0f} live traces "
            f"of {sent:,} sent, RSS {before / 2**20:,.0f} -> {after / 2**20:,.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="load per mix")
    parser.add_argument("--mix", action="append",
                        choices=[*MIXES, "lookup", "live"],
                        help="run only these phases (repeatable); default: all")
    parser.add_argument("--lookup-spans", type=int, default=5_000_000,
                        help="spans stored before the lookups (0: skip)")
    parser.add_argument("--lookup-max-seconds", type=float, default=900.0,
                        help="bound on loading --lookup-spans")
    parser.add_argument("--live-traces", type=int, default=20_000, help="0: skip")
    parser.add_argument("--trace-idle", default="1s")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="longest wait for the verdicts after a mix's load")
    parser.add_argument("--parse-seconds", type=float, default=2.0,
                        help="how long the bare parse rate is measured, per phase")
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--spans", type=int, default=500, help="spans per request")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy record the server during each mix's load")
    args = parser.parse_args()
    phases = args.mix or [*MIXES, "lookup", "live"]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    rows = [run_mix(name, args) for name in MIXES if name in phases]
    extra = []
    if "lookup" in phases and args.lookup_spans > 0:
        extra.append(run_lookup(args))
    if "live" in phases and args.live_traces > 0:
        extra.append(run_live(args))
    print(f"outcomewatch verdict bench: {args.spans} spans/request, traces of 10, "
          f"{args.in_flight} calls in flight, --trace-idle {args.trace_idle}, "
          f"{args.seconds:g} s per mix")
    print("latency ms from the send of a trace's last span: to its runs' closed_at (fail, pass);"
          " to its verdict readable in the API (seen, n sampled traces)")
    if rows:
        print(HEADER)
        for row in rows:
            print(row.line())
    for line in extra:
        print(line)


if __name__ == "__main__":
    main()
