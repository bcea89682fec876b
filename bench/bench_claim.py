"""What one verdict batch costs as the runs table grows: the heavy mix's batch (runs opened and
decided, half failing into one incident) written through the real Store, after N runs are
already stored.

The issue asks for verdict writes whose cost grows "with the number of (rule, group) pairs
touched, not with the number of runs". bench_verdicts.py cannot show a violation of that: its
mixes store ~50k runs. Here the table is filled first (closed runs and their search keys, by
bulk SQL in the shape the verdict path writes, so that 2M runs take seconds, then checkpointed
as the server's checkpoints leave them), then the batch is written ``--repeat`` times per size
through ``Store.write_verdicts_and_wait``; the median is printed.

    .venv/bin/python bench/bench_claim.py --sizes 0,500000,2000000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from outcomewatch.incidents.lifecycle import Policy
from outcomewatch.model import FailureReason, RunFailed, RunOpened, RunPassed
from outcomewatch.store.duckdb import Store
from outcomewatch.store.verdicts import Judged, VerdictBatch

RULE = "bench-claim"


def fill(store: Store, upto: int, have: int) -> None:
    """Runs ``have``..``upto`` as closed runs of RULE (1 in 2 failed), one search key each."""
    if upto <= have:
        return

    def work(db: duckdb.DuckDBPyConnection) -> None:
        run = (f"SELECT 'old-' || i AS id, '{RULE}' AS rule, md5(i::varchar) AS trace_id, "
               f"substr(md5(i::varchar), 1, 16) AS span, "
               f"CASE WHEN i % 2 = 0 THEN 'failed' ELSE 'passed' END AS status, "
               f"TIMESTAMPTZ '2026-01-01' + to_milliseconds(i) AS stamp "
               f"FROM range({have}, {upto}) t(i)")
        db.execute(f"INSERT INTO runs (id, rule, trace_id, trigger_span_id, status, opened_at, "
                   f"closed_at, reason, group_key) SELECT id, rule, trace_id, span, status, stamp, "
                   f"stamp, CASE WHEN status = 'failed' THEN 'trace_idle' END, '' FROM ({run})")
        db.execute(f"INSERT INTO run_keys SELECT id, 'customer.id', trace_id FROM ({run})")

    asyncio.run(store.run(work))
    # As the server's checkpoints (every 30 s) leave the file: the rows compressed on disk.
    asyncio.run(store.run(lambda db: db.execute("CHECKPOINT")))


def batch(now: datetime, runs: int) -> VerdictBatch:
    """``runs`` runs opened and decided in one batch, every second one failing."""
    out = VerdictBatch(policies={RULE: Policy()})
    for k in range(runs):
        run_id, trace = f"new-{uuid.uuid4().hex}", uuid.uuid4().hex
        opened = now - timedelta(seconds=2)
        out.events.append(RunOpened(run_id, RULE, trace, trace[:16], opened, None,
                                    (("customer.id", trace[:8]),)))
        verdict: RunPassed | RunFailed = (
            RunFailed(run_id, RULE, trace, None, opened, now, FailureReason.TRACE_IDLE,
                      ("email.delivered",), 0) if k % 2 else
            RunPassed(run_id, RULE, trace, opened, now))
        out.events.append(Judged(verdict, summary="bench failed"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,500000,2000000")
    parser.add_argument("--runs", type=int, default=400, help="runs per batch")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(str(Path(tmp) / "claim.duckdb"))
        try:
            have = 0
            now = datetime(2026, 6, 1, tzinfo=UTC)
            print(f"one verdict batch of {args.runs} runs opened and decided (half failing), "
                  f"median of {args.repeat}")
            for size in (int(s) for s in args.sizes.split(",")):
                fill(store, size, have)
                have = max(have, size)
                took = []
                for _ in range(args.repeat):
                    now += timedelta(seconds=1)
                    started = time.perf_counter()
                    asyncio.run(store.write_verdicts_and_wait(batch(now, args.runs)))
                    took.append(time.perf_counter() - started)
                    have += args.runs
                print(f"  runs stored {size:>10,}: {statistics.median(took) * 1e3:8.1f} ms")
        finally:
            store.close()


if __name__ == "__main__":
    main()
