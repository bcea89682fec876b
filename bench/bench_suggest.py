"""Suggest benchmark: how long does ``outcomewatch suggest`` take over stored spans?

    .venv/bin/python bench/bench_suggest.py [--spans 5000000] [--db FILE] [--seed 7]

Builds (or reuses, with ``--db``) a DuckDB file of ``--spans`` stored spans with the replay
benchmark's generator (bench_replay.build: an hour of traffic, traces of 4 to 16 spans, about a
third of them telling a workflow's story, the rest noise), then runs the suggestion query
alone, the sampled decoding for ``correlate``, and the whole of ``suggest`` with its backtest
(the offline replay of the proposed rules), and prints the seconds of each, the stored spans
per second and what was proposed.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import duckdb
from bench_replay import build

from outcomewatch.offline.replay import ReplayReport, replay
from outcomewatch.offline.suggest import render, suggest_file
from outcomewatch.offline.suggest_correlate import correlations
from outcomewatch.offline.suggest_sql import observe
from outcomewatch.rules import RuleSet


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=5_000_000)
    parser.add_argument("--db", help="reuse (or keep) this DuckDB file")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--min-traces", type=int, default=20)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-suggest-"))
    try:
        db_path = Path(args.db) if args.db else scratch / "spans.duckdb"
        if not db_path.exists():
            started = time.perf_counter()
            build(db_path, args.spans, random.Random(args.seed))
            print(f"built in {time.perf_counter() - started:.1f}s", file=sys.stderr)

        conn = duckdb.connect(str(db_path), read_only=True)
        (stored,) = conn.execute("SELECT count(*) FROM spans").fetchone() or (0,)
        started = time.perf_counter()
        workflows = observe(conn, since_ns=-(2**63), trigger="*", min_traces=args.min_traces)
        sql_s = time.perf_counter() - started
        started = time.perf_counter()
        correlated = correlations(conn, workflows, -(2**63))
        correlate_s = time.perf_counter() - started
        conn.close()

        replay_s = 0.0

        def backtest(rules: RuleSet) -> ReplayReport:
            nonlocal replay_s
            begun = time.perf_counter()
            report = replay(rules, str(db_path))
            replay_s = time.perf_counter() - begun
            return report

        started = time.perf_counter()
        report = suggest_file(str(db_path), min_traces=args.min_traces, backtest=backtest)
        total_s = time.perf_counter() - started
        print(render(report, "text"))
        print()
        print(f"stored spans:                {stored}")
        print(f"workflow starts found:       {len(workflows)}")
        print(f"rules proposed:              {len(report['suggestions'])}")
        print(f"suggestion SQL:              {sql_s:.2f}s ({stored / sql_s:,.0f} spans/s)")
        print(f"correlate (sampled decode):  {correlate_s:.2f}s, {len(correlated)} found")
        print(f"suggest with backtest:       {total_s:.2f}s "
              f"(of which the backtest replay {replay_s:.2f}s)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
