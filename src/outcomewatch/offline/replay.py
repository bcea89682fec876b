"""``outcomewatch replay``: the runs and incidents rules would have produced from stored spans.

The database is opened read-only and nothing is written. The work is split where it is cheap:

DuckDB (SQL) decides which rows reach Python:
- *candidate spans*: the rows whose name, service, status and duration could match some
  selector of some rule (``candidates.candidate_predicate``), with their blobs, in the order
  received (``received_ns``, then insertion order within a request);
- *touches*: the engine's idle timer is reset by every span of a live trace, including spans no
  rule looks at. One row per (trace, received_ns) is computed by ``GROUP BY`` over all stored
  spans, and only where it matters: for traces with a candidate span, received after the
  trace's first candidate, in requests that carry no candidate span of that trace.

Python feeds them to the real Engine, request by request as the server received them: each
received_ns becomes one OTLP request (the candidate spans as stored, plus a stand-in span per
touch) and goes through ``otlp.batch_from_request`` and ``Engine.observe`` with a ManualClock
at that instant, ticking as time passes (see ``drive``). After the last request the clock runs
on past every deadline. The stand-in span keeps the trace id of its group and is built so that
no selector can match it (a name no selector's glob matches; failing that, the name, service,
status and duration of one real non-candidate span of the group).

A scheduled slot is judged only when the stored data covers its grace period (slot + grace no
later than the last stored span): after that the data cannot say whether the job started.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Status

from outcomewatch.errors import RuleError, StoreError
from outcomewatch.model import FailureReason, RunFailed, RunStatus
from outcomewatch.offline.candidates import candidate_predicate, selectors
from outcomewatch.offline.drive import (
    BookIncident,
    Driver,
    IncidentBook,
    RunRecord,
    Verdicts,
    at_ns,
    settle_horizon,
)
from outcomewatch.otlp import batch_from_request
from outcomewatch.rules import RuleSet, load_rules
from outcomewatch.store import traces

FETCH_ROWS = 20_000
TOUCH_SPAN_ID = b"\xff" * 8
_TOUCH_NAMES = ("outcomewatch.replay.idle-touch", "\x00", "")


@dataclass
class ReplayStats:
    stored_spans: int = 0  # every row of the spans table
    window_spans: int = 0  # rows received since the --since bound
    candidate_spans: int = 0  # rows decoded in Python
    touch_rows: int = 0  # (trace, received_ns) rows that only reset an idle timer
    requests: int = 0  # requests fed to the engine
    seconds: float = 0.0


@dataclass
class ReplayReport:
    rules: RuleSet
    runs: list[RunRecord]
    incidents: list[BookIncident]
    stats: ReplayStats
    first_received: datetime | None = None
    last_received: datetime | None = None
    settled_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _touch_name(rules: RuleSet) -> str | None:
    """A span name no selector's glob matches, if there is one among a few odd names."""
    every = selectors(rules)
    for name in _TOUCH_NAMES:
        if not any(s.matches_name(name) for s in every):
            return name
    return None


def _rows(cursor: duckdb.DuckDBPyConnection) -> Iterator[tuple[Any, ...]]:
    while True:
        chunk = cursor.fetchmany(FETCH_ROWS)
        if not chunk:
            return
        yield from chunk


class _Feed:
    """Merges the candidate and touch streams (both ordered by received_ns) into requests."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, touch_name: str | None) -> None:
        self._conn = conn
        self._touch_name = touch_name

    def requests(
        self, candidates: Iterator[tuple[Any, ...]], touches: Iterator[tuple[Any, ...]],
        stats: ReplayStats,
    ) -> Iterator[tuple[int, ExportTraceServiceRequest]]:
        cand = next(candidates, None)
        touch = next(touches, None)
        while cand is not None or touch is not None:
            received = min(r[0] for r in (cand, touch) if r is not None)
            request = ExportTraceServiceRequest()
            last_key: tuple[int, str] | None = None
            resource_spans: ResourceSpans | None = None
            while cand is not None and cand[0] == received:
                _, raw, scope, resource_id = cand
                if (resource_id, scope) != last_key or resource_spans is None:
                    resource_spans = request.resource_spans.add()
                    resource_spans.resource.ParseFromString(
                        traces.resource_bytes(self._conn, resource_id))
                    resource_spans.scope_spans.add().scope.name = scope
                    last_key = (resource_id, scope)
                resource_spans.scope_spans[0].spans.add().ParseFromString(bytes(raw))
                stats.candidate_spans += 1
                cand = next(candidates, None)
            stand_ins: dict[str, ResourceSpans] = {}
            while touch is not None and touch[0] == received:
                self._stand_in(request, stand_ins, touch)
                stats.touch_rows += 1
                touch = next(touches, None)
            stats.requests += 1
            yield received, request

    def _stand_in(self, request: ExportTraceServiceRequest, by_service: dict[str, ResourceSpans],
                  touch: tuple[Any, ...]) -> None:
        trace_id = bytes.fromhex(str(touch[1]))
        if self._touch_name is not None:
            name, service, status, start, end = self._touch_name, "", 0, 0, 0
        else:
            template = touch[2]
            name, service = str(template["name"]), str(template["service"])
            status, start, end = (int(template["status_code"]), int(template["start_ns"]),
                                  int(template["end_ns"]))
        resource_spans = by_service.get(service)
        if resource_spans is None:
            resource_spans = by_service[service] = request.resource_spans.add()
            if service:
                attribute = resource_spans.resource.attributes.add(key="service.name")
                attribute.value.string_value = service
            resource_spans.scope_spans.add()
        span = resource_spans.scope_spans[0].spans.add(
            trace_id=trace_id, span_id=TOUCH_SPAN_ID, name=name,
            start_time_unix_nano=start, end_time_unix_nano=end)
        span.status.code = Status.StatusCode.ValueType(status)


def queries(rules: RuleSet, with_template: bool) -> tuple[str, str, list[object]]:
    predicate, params = candidate_predicate(rules)
    candidates = (
        "SELECT received_ns, span, scope, resource_id FROM spans "
        f"WHERE received_ns >= ? AND {predicate} ORDER BY received_ns, rowid"
    )
    template = (", min({'name': name, 'service': service, 'status_code': status_code, "
                "'start_ns': start_ns, 'end_ns': end_ns}) AS template") if with_template else ""
    touches = (
        f"WITH f AS (SELECT trace_id, received_ns, {predicate} AS cand, name, service, "
        "status_code, start_ns, end_ns FROM spans WHERE received_ns >= ?), "
        "firsts AS (SELECT trace_id, min(received_ns) AS first_ns FROM f WHERE cand "
        "GROUP BY trace_id) "
        f"SELECT f.received_ns, f.trace_id{template} FROM f JOIN firsts USING (trace_id) "
        "WHERE f.received_ns > firsts.first_ns GROUP BY f.received_ns, f.trace_id "
        "HAVING NOT bool_or(f.cand) ORDER BY f.received_ns, f.trace_id"
    )
    return candidates, touches, params


def replay(
    rules: RuleSet, db_path: str, *, since_ns: int | None = None,
    idle: timedelta = timedelta(seconds=10), grid: timedelta = timedelta(seconds=1),
) -> ReplayReport:
    """Evaluate ``rules`` against the spans stored in the file ``db_path`` (received at or after
    ``since_ns``), opened read-only; raises StoreError when it cannot be read, when a running
    server holds it, or when it is a copy taken while a server ran without its write-ahead log
    (the newest data lives there: the verdicts would be wrong)."""
    conn = open_for_replay(db_path)
    try:
        return replay_on(conn, rules, since_ns=since_ns, idle=idle, grid=grid)
    except duckdb.Error as exc:
        raise StoreError(f"cannot read database {db_path}: {exc}") from exc
    finally:
        conn.close()


def open_for_replay(db_path: str) -> duckdb.DuckDBPyConnection:
    """``db_path`` opened read-only, or StoreError saying what to do instead."""
    if not Path(db_path).is_file():
        raise StoreError(f"no database file {db_path}")
    try:
        conn = duckdb.connect(db_path, read_only=True)
    except duckdb.Error as exc:
        if "lock" in str(exc).lower():
            raise StoreError(
                f"database {db_path} is held by a running server: replay through it with "
                "`outcomewatch replay --api URL`, or stop it first") from exc
        raise StoreError(f"cannot open database {db_path} read-only: {exc}") from exc
    try:
        running = conn.execute("SELECT bool_or(running) FROM server_state").fetchone()
    except duckdb.Error:
        running = None  # a file of an earlier version: nothing recorded
    if running is not None and running[0] and not Path(f"{db_path}.wal").exists():
        conn.close()
        raise StoreError(
            f"database {db_path} was copied while its server was running, without "
            f"{Path(db_path).name}.wal beside it: its newest spans are missing and the verdicts "
            "would be wrong; copy both files, stop the server first, or use "
            "`outcomewatch replay --api URL`")
    return conn


def replay_on(
    conn: duckdb.DuckDBPyConnection, rules: RuleSet, *, since_ns: int | None = None,
    idle: timedelta = timedelta(seconds=10), grid: timedelta = timedelta(seconds=1),
) -> ReplayReport:
    """``replay`` on an open connection or cursor (the running server's own, for a backtest
    that reads a consistent snapshot while ingest goes on); writes nothing. duckdb errors
    propagate."""
    started = time.perf_counter()
    stats = ReplayStats()
    bound = since_ns if since_ns is not None else -(2**63)
    row = conn.execute("SELECT count(*), count(*) FILTER (WHERE received_ns >= ?), "
                       "min(received_ns) FILTER (WHERE received_ns >= ?), "
                       "max(received_ns) FROM spans", [bound, bound]).fetchone()
    assert row is not None
    stats.stored_spans, stats.window_spans = int(row[0]), int(row[1])
    report = ReplayReport(rules, [], [], stats)
    if row[2] is None:
        stats.seconds = time.perf_counter() - started
        return report
    first, last = at_ns(int(row[2])), at_ns(int(row[3]))
    keep = _covered(rules, last)
    verdicts = Verdicts(IncidentBook.for_rules(rules), keep_failure=keep)
    driver = Driver(rules, idle=idle, start=first, grid=grid, verdicts=verdicts)
    touch_name = _touch_name(rules)
    candidates_sql, touches_sql, params = queries(rules, with_template=touch_name is None)
    candidates = conn.cursor().execute(candidates_sql, [bound, *params])
    touches = conn.cursor().execute(touches_sql, [*params, bound])
    feed = _Feed(conn, touch_name)
    for received, request in feed.requests(_rows(candidates), _rows(touches), stats):
        driver.deliver(batch_from_request(request, received_ns=received))
    driver.advance_to(last + settle_horizon(rules, idle))
    report.runs = list(verdicts.runs.values())
    report.incidents = verdicts.book.incidents
    report.first_received, report.last_received = first, last
    report.settled_at = driver.now()
    stats.seconds = time.perf_counter() - started
    return report


def _covered(rules: RuleSet, data_end: datetime) -> Callable[[RunFailed], bool]:
    def keep(failure: RunFailed) -> bool:
        if failure.reason is not FailureReason.MISSED:
            return True
        rule = rules.by_name(failure.rule)
        grace = rule.schedule.grace if rule is not None and rule.schedule is not None else None
        return grace is None or failure.opened_at + grace <= data_end

    return keep


# -- the report ------------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def report_json(report: ReplayReport) -> dict[str, Any]:
    per_rule: dict[str, dict[str, Any]] = {
        rule.name: {"rule": rule.name, "passed": 0, "failed": 0, "open": 0, "reasons": {}}
        for rule in report.rules
    }
    reasons: dict[str, Counter[str]] = {name: Counter() for name in per_rule}
    for run in report.runs:
        entry = per_rule.setdefault(run.rule, {"rule": run.rule, "passed": 0, "failed": 0,
                                               "open": 0, "reasons": {}})
        entry[run.status.value] += 1
        if run.reason is not None:
            reasons.setdefault(run.rule, Counter())[run.reason.value] += 1
    for name, counts in reasons.items():
        per_rule[name]["reasons"] = dict(sorted(counts.items()))
    return {
        "window": {"first_received": _iso(report.first_received),
                   "last_received": _iso(report.last_received),
                   "settled_at": _iso(report.settled_at)},
        "rules": list(per_rule.values()),
        "incidents": [
            {"rule": i.rule, "group": i.group, "status": i.status.value,
             "failure_count": i.failure_count, "first_failure": _iso(i.first_failure),
             "last_failure": _iso(i.last_failure)}
            for i in report.incidents
        ],
        "failed_runs": [
            {"id": r.run_id, "rule": r.rule, "trace_id": r.trace_id,
             "reason": r.reason.value if r.reason is not None else None,
             "missing": list(r.missing), "opened_at": _iso(r.opened_at),
             "closed_at": _iso(r.closed_at)}
            for r in report.runs if r.status is RunStatus.FAILED
        ],
        "stats": vars(report.stats) | {"seconds": round(report.stats.seconds, 3)},
    }


def render_replay(report: ReplayReport | dict[str, Any], fmt: str) -> str:
    """The report as ``fmt`` (text or json); a dict is a report already as JSON (the answer
    of ``POST /api/v1/replay``)."""
    data = report if isinstance(report, dict) else report_json(report)
    if fmt == "json":
        return json.dumps(data, indent=2, default=str)
    window = data["window"]
    lines = [f"spans received {window['first_received']} .. {window['last_received']} "
             f"(runs settled at {window['settled_at']})" if window["first_received"]
             else "no stored spans in the window",
             "", f"{'rule':<40} {'passed':>7} {'failed':>7} {'open':>5}  reasons"]
    for entry in data["rules"]:
        reasons = ", ".join(f"{k} {v}" for k, v in entry["reasons"].items())
        lines.append(f"{entry['rule']:<40} {entry['passed']:>7} {entry['failed']:>7} "
                     f"{entry['open']:>5}  {reasons}")
    lines.append("")
    lines.append(f"incidents: {len(data['incidents'])}")
    for incident in data["incidents"]:
        group = f" {json.dumps(incident['group'], sort_keys=True)}" if incident["group"] else ""
        lines.append(f"  {incident['rule']}{group}: {incident['status']}, "
                     f"{incident['failure_count']} failure(s), first {incident['first_failure']}, "
                     f"last {incident['last_failure']}")
    s = data["stats"]
    lines.append("")
    lines.append(f"{s['stored_spans']} stored spans, {s['window_spans']} in the window, "
                 f"{s['candidate_spans']} candidates decoded, {s['touch_rows']} idle touches, "
                 f"{s['requests']} requests replayed in {s['seconds']}s")
    return "\n".join(lines)


__all__ = ["ReplayReport", "ReplayStats", "render_replay", "replay", "report_json"]


def backtest(
    conn: duckdb.DuckDBPyConnection, rules_yaml: str, *, since_ns: int | None,
    idle: timedelta,
) -> dict[str, Any]:
    """``replay --format json`` of the rule file text ``rules_yaml`` on an open connection (the
    running server's own: one read transaction, nothing written). Raises RuleError for invalid
    rules, their problems located in "request.yaml"."""
    with tempfile.TemporaryDirectory(prefix="outcomewatch-backtest-") as folder:
        path = Path(folder) / "request.yaml"
        path.write_text(rules_yaml, encoding="utf-8")
        try:
            rules = load_rules([str(path)])
        except RuleError as exc:
            raise RuleError([replace(p, file="request.yaml") for p in exc.problems]) from None
    cursor = conn.cursor()
    try:
        cursor.begin()  # one snapshot: ingest goes on beside it
        return report_json(replay_on(cursor, rules, since_ns=since_ns, idle=idle))
    finally:
        cursor.close()
