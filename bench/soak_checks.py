"""The checks of bench/soak.py: what the server says through its API before it stops, and what
its file holds after (opened read-only), against what the soak's client had acknowledged.

Contract: :func:`api_evidence` is called while the server still runs; :func:`report` after it
stopped. ``report`` prints the figures and returns the names of the checks that failed (empty:
all passed), so that the soak can exit non-zero. Spans of a trace may have been deleted by
retention: a trace is checked only when its first export was sent less than its retention ago
(``--evidence-retention`` when it has a failed run, ``--retention`` otherwise, 2 s of margin).

Checks:

- lost: every acknowledged span of a checked trace is stored;
- verdicts: every trigger trace has exactly one run of each rule of the mix, closed, with the
  mix's expected status; duplicated = more than one run of a rule for a trace;
- failures: no run id twice in incident_failures, every failed run attached to an incident (no
  rule of the mixes has open_after) and the incidents' failure_count sum equals those;
- outbox: no (incident, transition, target) row twice;
- evidence: a failure's incident file is built at read from the trace's spans received up to
  the verdict (incident_file.py); a failure of a checked trace with none of them stored, or
  without its trigger span stored, is evidence-less (the file, and through the API
  ``GET /api/v1/incidents/{id}``, the newest 200 failures of each incident: ``span_count`` 0).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import httpx
from soak_mix import Export, Mix

MiB = 1024 * 1024
MARGIN_S = 2.0


@dataclass
class Run:
    """Everything the soak measured, for the report."""

    mix: Mix
    exports: list[Export]
    attempts: int
    refusals: Counter[str]
    kills: int
    startups: list[float]
    exit_code: int
    acked_all: bool
    max_rss_kib: int
    samples: list[tuple[float, int, int, int]]  # (t, file bytes, wal bytes, exports acked)
    deleted: Counter[str]
    began: float  # monotonic
    stopped_at: float  # monotonic
    retention_s: float
    evidence_s: float
    api_checked: int = 0
    api_evidence_less: list[str] = field(default_factory=list)
    disk_summary: str = ""
    disk_failed: list[str] = field(default_factory=list)


def first_sent(exports: list[Export]) -> dict[str, float]:
    """Trace id -> when its first acknowledged export was first sent."""
    first: dict[str, float] = {}
    for export in exports:
        if export.acked:
            for trace_id in export.spans:
                first[trace_id] = min(first.get(trace_id, export.first_sent), export.first_sent)
    return first


def api_evidence(api: str, checkable: set[str]) -> tuple[int, list[str]]:
    """(failures of ``checkable`` traces looked at, run ids of those whose incident file has no
    span) over the newest 200 failures of every incident."""
    checked, evidence_less = 0, []
    with httpx.Client(base_url=api, timeout=60) as client:
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = client.get("/api/v1/incidents", params=params).json()
            for incident in page["incidents"]:
                detail = client.get(f"/api/v1/incidents/{incident['id']}",
                                    params={"failures": 200}).json()
                for failure in detail["failures"]:
                    if failure["trace_id"] not in checkable:
                        continue
                    checked += 1
                    if not failure["span_count"] or not failure["trigger"]:
                        evidence_less.append(failure["run_id"])
            cursor = page.get("next_cursor")
            if not cursor:
                return checked, evidence_less


_EVIDENCE = """
SELECT f.run_id, f.trace_id, count(DISTINCT s.span_id),
       count(s.span_id) FILTER (s.span_id = f.detail ->> '$.trigger.span_id')
FROM incident_failures f LEFT JOIN spans s ON s.trace_id = f.trace_id
     AND s.received_ns <= CAST(f.detail ->> '$.received_until_ns' AS BIGINT)
WHERE f.detail ->> '$.trigger.span_id' IS NOT NULL
GROUP BY f.run_id, f.trace_id
"""


def _read(db: Path) -> dict[str, Any]:
    conn = duckdb.connect(str(db), read_only=True)
    try:
        def one(sql: str) -> tuple[Any, ...]:
            row = conn.execute(sql).fetchone()
            assert row is not None
            return tuple(row)

        return {
            "stored": dict(conn.execute(
                "SELECT trace_id, count(DISTINCT span_id) FROM spans GROUP BY ALL").fetchall()),
            "runs": conn.execute(
                "SELECT trace_id, rule, status, count(*) FROM runs GROUP BY ALL").fetchall(),
            "failure_dupes": one("SELECT count(*) FROM (SELECT run_id FROM incident_failures "
                                 "GROUP BY ALL HAVING count(*) > 1)")[0],
            "failures": one("SELECT count(*), count(*) FILTER (incident_id IS NOT NULL) "
                            "FROM incident_failures"),
            "incidents": one("SELECT count(*), coalesce(sum(failure_count), 0) FROM incidents"),
            "outbox": one("SELECT count(*) FROM outbox"),
            "outbox_dupes": one("SELECT count(*) FROM (SELECT incident_id, transition, target "
                                "FROM outbox GROUP BY ALL HAVING count(*) > 1)")[0],
            "total_spans": one("SELECT count(*) FROM spans")[0],
            "evidence": conn.execute(_EVIDENCE).fetchall(),
        }
    finally:
        conn.close()


def report(run: Run, db: Path, args: argparse.Namespace) -> list[str]:
    """Print the figures; return the names of the failed checks."""
    got = _read(db)
    stored: dict[str, int] = got["stored"]
    failed_traces = {trace for trace, _, status, _ in got["runs"] if status == "failed"}
    first = first_sent(run.exports)

    def checkable(trace_id: str) -> bool:
        keep = run.evidence_s if trace_id in failed_traces else run.retention_s
        return first[trace_id] >= run.stopped_at - keep + MARGIN_S

    acked: Counter[str] = Counter()
    triggers: set[str] = set()
    for export in run.exports:
        if export.acked:
            acked.update(export.spans)
            triggers.update(export.triggers)
    checked = {t: n for t, n in acked.items() if checkable(t)}
    lost = sum(max(0, n - stored.get(t, 0)) for t, n in checked.items())
    window = min((first[t] for t in checked), default=run.stopped_at)

    runs: Counter[tuple[str, str]] = Counter()
    statuses: Counter[str] = Counter()
    wrong = 0
    for trace_id, rule, status, count in got["runs"]:
        runs[trace_id, rule] += count
        statuses[status] += count
        want = run.mix.expected.get(rule)
        if trace_id in triggers and status != "open" and want is not None and status != want:
            wrong += count
    without = sum(1 for t in triggers for rule in run.mix.expected if (t, rule) not in runs)
    duplicated = sum(1 for n in runs.values() if n > 1)

    evidence_checked = evidence_less = partial = 0
    for _run_id, trace_id, spans, trigger in got["evidence"]:
        if trace_id not in first or not checkable(trace_id):
            continue
        evidence_checked += 1
        evidence_less += spans == 0 or trigger == 0
        partial += 0 < spans < acked[trace_id]
    failures, attached = got["failures"]
    incidents, counted = got["incidents"]
    failed_runs = statuses.get("failed", 0)

    a = args
    print(f"soak: mix {run.mix.name}, {a.minutes:g} min at ~{a.rate:g} exports/s ({a.workers} "
          f"threads), kill -9 every ~{a.kill_every:g}s, trace idle {a.trace_idle}, retention "
          f"{a.retention} / evidence {a.evidence_retention} every {a.retention_interval}")
    print(f"kills: {run.kills} (kill -9, restart on the same file); startups "
          f"{', '.join(f'{s:.1f}s' for s in run.startups)}; final SIGTERM exit code "
          f"{run.exit_code}")
    if run.disk_summary:
        print(run.disk_summary)
    print(f"exports: {len(run.exports)} made, {run.attempts} attempts, refused attempts "
          f"{dict(run.refusals) or 0}, all acknowledged in the end: {run.acked_all}")
    print(f"spans: {sum(acked.values())} acknowledged; {sum(checked.values())} in traces "
          f"younger than their retention checked (first sent from t="
          f"{max(0.0, window - run.began):.0f}s), lost {lost}; "
          f"{got['total_spans']} rows stored")
    print(f"traces with a trigger: {len(triggers)}; runs {dict(statuses)}; missing runs "
          f"(trace, rule): {without}; duplicated verdicts (trace, rule with >1 run): "
          f"{duplicated}; unexpected status: {wrong}")
    print(f"failures: {failures} incident_failures rows ({attached} attached), duplicated run "
          f"ids {got['failure_dupes']}; incidents {incidents} with failure_count sum {counted}"
          f" (failed runs {failed_runs}); outbox rows {got['outbox'][0]}, duplicated "
          f"{got['outbox_dupes']}")
    print(f"evidence: {evidence_checked} failures of checked traces in the file, evidence-less"
          f" {evidence_less}, with fewer spans than acknowledged {partial}; API: "
          f"{run.api_checked} failures read, evidence-less {len(run.api_evidence_less)}")
    print(f"retention deleted: {dict(run.deleted) or 0}")
    sizes = [size for _, size, _, _ in run.samples]
    print(f"server RSS max: {run.max_rss_kib / 1024:.0f} MiB; file size {min(sizes) / MiB:.1f}"
          f" .. {max(sizes) / MiB:.1f} MiB")
    print("database file over time (t, file, wal, exports acked):")
    for t, size, wal, acked_exports in run.samples:
        print(f"  {t:7.1f}s  {size / MiB:8.1f} MiB  wal {wal / MiB:7.1f} MiB  {acked_exports:>8}")

    checks = {
        "all acknowledged": run.acked_all, "clean stop": run.exit_code == 0, "lost": lost == 0,
        "verdicts": without == 0 and duplicated == 0 and wrong == 0 and not statuses["open"],
        "failures": got["failure_dupes"] == 0 and attached == failures == failed_runs == counted,
        "outbox": got["outbox_dupes"] == 0,
        "evidence": evidence_less == 0 and not run.api_evidence_less,
        **{name: False for name in run.disk_failed},
    }
    failed = [name for name, ok in checks.items() if not ok]
    print("checks: " + ", ".join(f"{name} {'OK' if ok else 'FAILED'}"
                                 for name, ok in checks.items()))
    return failed
