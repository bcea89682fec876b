"""Prometheus metrics, on a registry the server owns (never the process-global one, so tests and
several servers in one process don't collide). Served at GET /metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Time from trigger to outcome spans seconds to hours for business workflows.
_OUTCOME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _OpenIncidents(Collector):
    """Open incidents by rule and severity, counted in the database at scrape time, so the
    figure is right after a restart and never drifts from the stored truth."""

    def __init__(self, count: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._count = count

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "outcomewatch_open_incidents", "Incidents open or acknowledged, by rule and severity.",
            labels=["rule", "severity"],
        )
        for rule, severity, count in self._count():
            family.add_metric([rule, severity], count)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.spans_received = Counter(
            "outcomewatch_spans_received", "Spans accepted and stored, by transport.",
            ["transport"], registry=r)
        self.spans_rejected = Counter(
            "outcomewatch_spans_rejected", "Spans refused (partial success), by transport.",
            ["transport"], registry=r)
        self.requests_refused = Counter(
            "outcomewatch_requests_refused",
            "Export requests refused as a whole, by transport and reason.",
            ["transport", "reason"], registry=r)
        self.runs = Counter(
            "outcomewatch_runs", "Runs by rule and status (opened, passed, failed).",
            ["rule", "status"], registry=r)
        self.time_to_outcome = Histogram(
            "outcomewatch_time_to_outcome_seconds",
            "From a run's opening to its verdict, by rule and verdict.",
            ["rule", "status"], buckets=_OUTCOME_BUCKETS, registry=r)
        self.late_outcomes = Counter(
            "outcomewatch_late_outcomes", "Outcomes that arrived after their run failed.",
            ["rule"], registry=r)
        self.evicted_traces = Counter(
            "outcomewatch_evicted_traces",
            "Live traces evaluated early because live state was over its budget.", registry=r)
        self.live_traces = Gauge(
            "outcomewatch_live_traces", "Traces held in memory with open runs or candidates.",
            registry=r)
        self.open_runs = Gauge(
            "outcomewatch_open_runs", "Runs waiting for their outcome.", registry=r)
        self.notifications = Counter(
            "outcomewatch_notifications", "Notification attempts by target and result.",
            ["target", "result"], registry=r)
        self.storage_write_seconds = Histogram(
            "outcomewatch_storage_write_seconds", "Duration of one group commit to DuckDB.",
            buckets=_WRITE_BUCKETS, registry=r)
        self.spans_deleted = Counter(
            "outcomewatch_spans_deleted",
            "Spans deleted by retention, by kind: passed (traces whose runs all passed, or "
            "that opened none; --retention) or evidence (traces of failed runs; "
            "--evidence-retention).",
            ["kind"], registry=r)

    # What the pipeline and the rule source report; the counters behind them are this module's.

    def run_opened(self, rule: str) -> None:
        self.runs.labels(rule, "opened").inc()

    def run_decided(self, rule: str, status: str, seconds: float) -> None:
        """A verdict (``status`` passed or failed), ``seconds`` from the run's opening."""
        self.runs.labels(rule, status).inc()
        self.time_to_outcome.labels(rule, status).observe(seconds)

    def rules_reloaded(self, *, ok: bool, at: float) -> None:
        """A rule (re)load finished; ``at`` is unix seconds. Counted from the next round on."""

    def watch_open_incidents(self, count: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self.registry.register(_OpenIncidents(count))

    def render(self) -> bytes:
        return generate_latest(self.registry)
