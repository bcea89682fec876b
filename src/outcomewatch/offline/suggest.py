"""``outcomewatch suggest`` and ``GET /api/v1/suggestions``: outcome rules proposed from the
stored traces, each with its backtest.

From the workflows ``suggest_sql.observe`` finds (computed in DuckDB), a rule is proposed per
workflow start: its ``expect`` items are the followers present in at least ``FOLLOWER_SHARE``
of the start's traces (at most ``MAX_EXPECT``, the latest-ending first: the outcome is what a
workflow ends with), with ``status: ok`` when the follower's spans set a status (none of its
traces leaves it unset) and are OK in most traces; ``within`` is the followers' largest p99
delay doubled, and at least ``MIN_MARGIN`` more (export batching delays the arrival of a span
past its end), rounded up to a whole second, minute or hour. An outcome in another trace (see
``suggest_correlate``: linked, or sharing an id attribute) adds its start to ``expect`` and a
``correlate: {by: KEY}``.

The proposals are rendered as a rule file (``rule_file``) that ``outcomewatch check`` accepts;
the backtest loads that very file and runs the offline replay over the same database. The
report is a JSON-able dict (``report``), which ``render`` prints as text, YAML or JSON, so the
CLI renders an API answer exactly as it renders a local one.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import yaml

from outcomewatch.durations import format_duration
from outcomewatch.errors import StoreError
from outcomewatch.offline.replay import ReplayReport, report_json
from outcomewatch.offline.suggest_correlate import Correlation, correlations, quantile
from outcomewatch.offline.suggest_sql import Follower, Workflow, observe
from outcomewatch.rules import RuleSet, load_rules

FOLLOWER_SHARE = 0.5
MAX_EXPECT = 3
MIN_MARGIN = timedelta(seconds=10)
OK_SHARE = 0.5

Backtest = Callable[[RuleSet], ReplayReport]


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")
    return slug or "workflow"


def _round_up(seconds: float) -> timedelta:
    """``seconds`` rounded up to a whole second, minute (past 10 minutes) or hour (past 10
    hours): a deadline a person reads and would write."""
    for unit in (3600, 60):
        if seconds > 10 * unit:
            return timedelta(seconds=math.ceil(seconds / unit) * unit)
    return timedelta(seconds=max(1, math.ceil(seconds)))


def within_for(p99_s: float) -> timedelta:
    """The proposed deadline for outcomes whose largest p99 delay is ``p99_s`` seconds."""
    return _round_up(max(2 * p99_s, p99_s + MIN_MARGIN.total_seconds()))


def _expects_ok(follower: Follower) -> bool:
    return follower.unset == 0 and follower.ok >= OK_SHARE * follower.present


def _selector(name: str, service: str) -> dict[str, Any]:
    selector: dict[str, Any] = {"span": name}
    if service:
        selector["service"] = service
    return selector


def _share(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0


def _name(workflow: Workflow, names: set[str]) -> str:
    name = _slug(workflow.name)
    if name in names:
        name = f"{name}-{_slug(workflow.service)}"
    base, suffix = name, 2
    while name in names:
        name, suffix = f"{base}-{suffix}", suffix + 1
    names.add(name)
    return name


def _frequent(workflow: Workflow) -> list[Follower]:
    """The followers in most of the workflow's traces, latest-ending first."""
    frequent = [f for f in workflow.followers if f.present >= FOLLOWER_SHARE * workflow.traces]
    return sorted(frequent, key=lambda f: (-f.p50_s, f.name, f.service))


def propose(workflows: list[Workflow], correlated: Sequence[Correlation] = ()
            ) -> list[dict[str, Any]]:
    """One proposal per workflow with a frequent follower or an outcome in another trace:
    ``rule`` (the rule as written to the file) and ``observed`` (the figures it came from)."""
    proposals: list[dict[str, Any]] = []
    names: set[str] = set()
    elsewhere: dict[tuple[str, str], list[Correlation]] = {}
    for correlation in correlated:
        key = (correlation.trigger.name, correlation.trigger.service)
        elsewhere.setdefault(key, []).append(correlation)
    for workflow in workflows:
        chosen = _frequent(workflow)[:MAX_EXPECT]
        others = elsewhere.get((workflow.name, workflow.service), [])[:MAX_EXPECT]
        if not chosen and not others:
            continue
        expect, outcomes, p99s = [], [], [f.p99_s for f in chosen]
        for follower in chosen:
            item = _selector(follower.name, follower.service)
            if _expects_ok(follower):
                item["status"] = "ok"
            expect.append(item)
            outcomes.append(_observed(follower, workflow.traces, _expects_ok(follower)))
        for correlation in others:
            item, observed, p99 = _correlated(correlation)
            expect.append(item)
            outcomes.append(observed)
            p99s.append(p99)
        rule: dict[str, Any] = {
            "name": _name(workflow, names),
            "description": f"Proposed by outcomewatch suggest from {workflow.traces} traces.",
            "trigger": _selector(workflow.name, workflow.service),
            "expect": expect,
            "within": format_duration(within_for(max(p99s))),
        }
        if others:
            rule["correlate"] = {"by": others[0].by}
        observed_all = {"traces": workflow.traces, "outcomes": outcomes,
                        "followers": len(workflow.followers)}
        proposals.append({"rule": rule, "observed": observed_all})
    return proposals


def _correlated(correlation: Correlation) -> tuple[dict[str, Any], dict[str, Any], float]:
    """The expect item, the observed figures and the p99 delay of an outcome in another
    trace (figures over the sampled trigger spans)."""
    other = correlation.other
    status = {k: correlation.status.get(k, 0) for k in ("ok", "error", "unset")}
    ok = status["unset"] == 0 and status["ok"] >= OK_SHARE * correlation.matched
    item = _selector(other.name, other.service)
    if ok:
        item["status"] = "ok"
    missing = correlation.sampled - correlation.matched
    p50, p95, p99 = (quantile(correlation.delays_s, q) for q in (0.5, 0.95, 0.99))
    observed = {
        "span": other.name, "service": other.service, "trace": "other",
        "correlate_by": correlation.by, "linked_share": correlation.linked_share,
        "sampled": correlation.sampled,
        "missing_share": _share(missing, correlation.sampled),
        "failing_share": _share(correlation.sampled - status["ok"] if ok else missing,
                                correlation.sampled),
        "status": status, "delay_p50_s": round(p50, 6), "delay_p95_s": round(p95, 6),
        "delay_p99_s": round(p99, 6),
    }
    return item, observed, p99


def _observed(follower: Follower, traces: int, expects_ok: bool) -> dict[str, Any]:
    missing = traces - follower.present
    failing = traces - follower.ok if expects_ok else missing
    return {
        "span": follower.name, "service": follower.service,
        "missing_share": _share(missing, traces),
        "failing_share": _share(failing, traces),
        "status": {"ok": follower.ok, "error": follower.error, "unset": follower.unset},
        "delay_p50_s": round(follower.p50_s, 6), "delay_p95_s": round(follower.p95_s, 6),
        "delay_p99_s": round(follower.p99_s, 6),
    }


def rule_file(proposals: list[dict[str, Any]]) -> str:
    """The proposals as one rule file, each rule preceded by a comment with what was seen."""
    lines = ["# Proposed by `outcomewatch suggest`: review owner, route and severity, then",
             "# keep the rules that describe outcomes a customer would notice.", "rules:"]
    for proposal in proposals:
        observed = proposal["observed"]
        lines.append(f"  # {observed['traces']} traces; " + "; ".join(
            f"{o['span']}{' (other trace)' if o.get('trace') == 'other' else ''} "
            f"missing in {o['missing_share']:.1%}"
            + (f", not ok in {o['failing_share']:.1%}" if o["failing_share"] != o["missing_share"]
               else "")
            + f", p95 {o['delay_p95_s']:.3f}s" for o in observed["outcomes"]))
        backtest = proposal.get("backtest")
        if backtest is not None:
            lines.append(f"  # backtest: {backtest['runs']} runs, {backtest['failed']} would "
                         f"have failed, {len(backtest['incidents'])} incident(s)")
        item = yaml.safe_dump([proposal["rule"]], sort_keys=False, allow_unicode=True)
        lines.extend("  " + line for line in item.rstrip("\n").split("\n"))
    if not proposals:
        lines[-1] = "rules: []"
    return "\n".join(lines) + "\n"


def _backtests(proposals: list[dict[str, Any]], backtest: Backtest) -> None:
    """Load the proposals' rule file as ``check`` would and attach each rule's replay."""
    with tempfile.TemporaryDirectory(prefix="outcomewatch-suggest-") as tmp:
        path = Path(tmp) / "suggested.yaml"
        path.write_text(rule_file(proposals))
        rules = load_rules([path])
    result = report_json(backtest(rules))
    per_rule = {entry["rule"]: entry for entry in result["rules"]}
    for proposal in proposals:
        name = proposal["rule"]["name"]
        entry = per_rule.get(name, {"passed": 0, "failed": 0, "open": 0, "reasons": {}})
        proposal["backtest"] = {
            "runs": entry["passed"] + entry["failed"] + entry["open"],
            "passed": entry["passed"], "failed": entry["failed"], "open": entry["open"],
            "reasons": entry["reasons"],
            "incidents": [i for i in result["incidents"] if i["rule"] == name],
        }


def suggest(
    conn: duckdb.DuckDBPyConnection, *, since_ns: int | None = None, trigger: str = "*",
    min_traces: int = 20, backtest: Backtest | None = None,
) -> dict[str, Any]:
    """The report: proposals over the spans of ``conn`` (received at or after ``since_ns``),
    each with ``backtest`` (None when no ``backtest`` is given). The query runs on a cursor of
    its own, so ``conn`` may be a connection other threads write through. Raises StoreError
    when the spans cannot be read."""
    bound = since_ns if since_ns is not None else -(2**63)
    try:
        with conn.cursor() as cursor:
            workflows = observe(cursor, since_ns=bound, trigger=trigger, min_traces=min_traces)
            # Outcomes of a matching trigger may be other starts, whatever their name.
            starts = workflows if trigger == "*" else observe(
                cursor, since_ns=bound, trigger="*", min_traces=min_traces)
            found = [c for c in correlations(cursor, starts, bound)
                     if any(c.trigger == w for w in workflows)]
    except duckdb.Error as exc:
        raise StoreError(f"cannot read the stored spans: {exc}") from exc
    proposals = propose(workflows, found)
    for proposal in proposals:
        proposal["backtest"] = None
    if backtest is not None and proposals:
        _backtests(proposals, backtest)
    return {"since_ns": since_ns, "trigger": trigger, "min_traces": min_traces,
            "workflows": len(workflows), "suggestions": proposals}


def suggest_file(
    db_path: str, *, since_ns: int | None = None, trigger: str = "*", min_traces: int = 20,
    backtest: Backtest | None = None,
) -> dict[str, Any]:
    """``suggest`` over the DuckDB file ``db_path``, opened read-only (closed before the
    backtest, which opens it again)."""
    try:
        conn = duckdb.connect(db_path, read_only=True)
    except duckdb.Error as exc:
        hint = ("; a running server holds it: ask the server instead (suggest --api URL)"
                if "lock" in str(exc).lower() else "")
        raise StoreError(f"cannot open database {db_path} read-only: {exc}{hint}") from exc
    try:
        report = suggest(conn, since_ns=since_ns, trigger=trigger, min_traces=min_traces)
    finally:
        conn.close()
    if backtest is not None and report["suggestions"]:
        _backtests(report["suggestions"], backtest)
    return report


def _text(report: Mapping[str, Any]) -> str:
    proposals = report["suggestions"]
    lines = [f"{len(proposals)} rule(s) proposed from {report['workflows']} workflow start(s) "
             f"with at least {report['min_traces']} traces"]
    for proposal in proposals:
        rule, observed = proposal["rule"], proposal["observed"]
        service = rule["trigger"].get("service")
        lines += ["", f"{rule['name']}: trigger {rule['trigger']['span']}"
                  + (f" ({service})" if service else "")
                  + f", {observed['traces']} traces, within {rule['within']}"]
        lines.append(f"  {'expect':<32} {'missing':>8} {'not ok':>8} {'ok/error/unset':>16} "
                     f"{'p50':>9} {'p95':>9}")
        for outcome in observed["outcomes"]:
            mix = "/".join(str(outcome["status"][k]) for k in ("ok", "error", "unset"))
            span = outcome["span"] + (" (other trace)" if outcome.get("trace") == "other" else "")
            lines.append(f"  {span:<32} {outcome['missing_share']:>8.1%} "
                         f"{outcome['failing_share']:>8.1%} {mix:>16} "
                         f"{outcome['delay_p50_s']:>8.3f}s {outcome['delay_p95_s']:>8.3f}s")
        backtest = proposal["backtest"]
        if backtest is None:
            lines.append("  backtest: not run")
        else:
            lines.append(f"  backtest: {backtest['runs']} runs, {backtest['failed']} would have "
                         f"failed, {len(backtest['incidents'])} incident(s)")
    return "\n".join(lines)


def render(report: Mapping[str, Any], fmt: str) -> str:
    """``report`` (as ``suggest`` returns it, or the API answers it) as text, yaml or json."""
    if fmt == "json":
        return json.dumps(report, indent=2)
    if fmt == "yaml":
        return rule_file(list(report["suggestions"])).rstrip("\n")
    return _text(report)


__all__ = ["Backtest", "propose", "render", "rule_file", "suggest", "suggest_file", "within_for"]
