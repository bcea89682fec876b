"""The verdict backlog counts towards backpressure (Reliability II, item 3), with a real
``outcomewatch serve`` process.

With ``--max-queue 1`` the store refuses new spans once more than 64 x 64 = 4096 verdict events
wait to be written. One export carrying thousands of triggers opens thousands of runs at once
(one "opened" event each) and, once the traces go idle, fails them all in the same tick (one
verdict each): each wave is a backlog far past the bound, written by one writer thread. A client
that keeps exporting meanwhile must get UNAVAILABLE naming the verdict backlog, then be
acknowledged again once the backlog is written; in the end every trigger has exactly one run and
every failed run is counted in its incident.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc

from tests.processes import EXPORT, Export, make_span, serving, wait_for

TRIGGERS = 6_000  # per wave: well past the 4096 bound of --max-queue 1
WAVES = 3  # more than one: a bound that never trips in one wave still gets a second chance


class Client:
    """A raw gRPC client that keeps the refusal's message (RawClient keeps only the code)."""

    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self._export = self.channel.unary_unary(EXPORT, request_serializer=None,
                                                response_deserializer=None)

    def send(self, body: bytes) -> tuple[grpc.StatusCode, str]:
        try:
            self._export(body, timeout=30)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""


def _wave(count: int) -> tuple[Export, set[str]]:
    """One export of ``count`` traces, each only a trigger: every one of them fails."""
    ids = [os.urandom(16) for _ in range(count)]
    return Export.of([make_span(t, "signup.completed") for t in ids]), {t.hex() for t in ids}


def _probe(trace: int) -> Export:
    """A small export no rule looks at."""
    return Export.of([make_span(trace.to_bytes(16, "big"), "db.query")])


def test_a_verdict_backlog_past_its_bound_refuses_exports_until_it_is_written(
    tmp_path: Path,
) -> None:
    triggers: set[str] = set()
    refusals: list[str] = []
    probes = 0
    with serving(tmp_path, trace_idle="500ms", args=["--max-queue", "1"]) as server:
        client = Client(server.grpc_endpoint)
        for _ in range(WAVES):
            wave, ids = _wave(TRIGGERS)
            code, message = client.send(wave.body)
            assert code == grpc.StatusCode.OK, message
            triggers |= ids
            # Export on, one at a time (so that no refusal is this client's own queueing),
            # through the opening and the failing of the wave's runs.
            give_up = time.monotonic() + 30
            while time.monotonic() < give_up:
                probes += 1
                code, message = client.send(_probe(probes).body)
                if code != grpc.StatusCode.OK:
                    assert code == grpc.StatusCode.UNAVAILABLE, (code, message)
                    refusals.append(message)
                if len(server.runs(status="failed")) >= len(triggers):
                    break
            if any("verdict backlog is full" in m for m in refusals):
                break
        backlog = sum("verdict backlog is full" in m for m in refusals)
        print(f"{probes} probes, {len(refusals)} refused, {backlog} for the verdict backlog")
        assert backlog, refusals[:5]
        # Written: acknowledged again.
        wait_for(lambda: client.send(_probe(0).body)[0] == grpc.StatusCode.OK,
                 "an export to be acknowledged once the backlog is written")

        def all_failed() -> bool:
            return len(server.runs(status="failed")) >= len(triggers)

        wait_for(all_failed, "every run to fail", timeout_s=60)
        runs = server.runs()
        by_trace: dict[str, int] = {}
        for run in runs:
            by_trace[run["trace_id"]] = by_trace.get(run["trace_id"], 0) + 1
        assert set(by_trace) == triggers
        assert {t: n for t, n in by_trace.items() if n != 1} == {}
        assert {r["status"] for r in runs} == {"failed"}
        incidents = server.client.get("/api/v1/incidents").json()["incidents"]
        assert sum(i["failure_count"] for i in incidents) == len(triggers)
        client.channel.close()
        assert server.terminate() == 0, server.output()[-2000:]
