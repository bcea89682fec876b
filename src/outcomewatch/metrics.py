"""Prometheus metrics, on a registry the server owns (never the process-global one, so tests and
several servers in one process don't collide). Served at GET /metrics.

Conventions, as a Prometheus user expects them: counters end in ``_total`` and are never mixed
with a different kind of event under one label (runs opened and runs decided are separate
counters, so ``sum by (rule)`` counts each run once); no ``_created`` series; gauges read from
the store drop to 0 instead of vanishing; ``outcomewatch_build_info`` and the rule reload gauges
of Prometheus's own ``prometheus_config_last_reload_*``.

Scraping never fails: a collector whose store read fails (a full or failing disk) is left out of
that scrape, one line is logged per failure streak, and the rest of the metrics are served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from outcomewatch import __version__

log = logging.getLogger(__name__)

# Time from trigger to outcome spans seconds to hours for business workflows.
_OUTCOME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# _created series double the series count and nobody queries them. The switch is
# prometheus_client's own and process-wide (read at scrape time).
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class _StoreCollector(Collector):
    """A collector that reads the store at scrape time; skipped from a scrape when it fails."""

    name = ""

    def __init__(self) -> None:
        self._failing = False

    def collect(self) -> Iterable[Metric]:
        try:
            families = list(self._families())
        except Exception as exc:  # a failing store must not turn the scrape into a 500
            if not self._failing:
                log.warning("metric %s left out while the store fails: %s: %s",
                            self.name, type(exc).__name__, exc)
            self._failing = True
            return []
        self._failing = False
        return families

    def _families(self) -> Iterable[Metric]:
        raise NotImplementedError


class _OpenIncidents(_StoreCollector):
    """Open incidents by rule and severity, counted in the database at scrape time, so the
    figure is right after a restart and never drifts from the stored truth. A (rule, severity)
    seen once in this process is reported as 0 once its incidents are resolved."""

    name = "outcomewatch_open_incidents"

    def __init__(self, count: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        super().__init__()
        self._count = count
        self._seen: set[tuple[str, str]] = set()

    def _families(self) -> Iterable[Metric]:
        counts = {(rule, severity): count for rule, severity, count in self._count()}
        self._seen.update(counts)
        family = GaugeMetricFamily(
            self.name, "Incidents open or acknowledged, by rule and severity.",
            labels=["rule", "severity"],
        )
        for rule, severity in sorted(self._seen):
            family.add_metric([rule, severity], counts.get((rule, severity), 0))
        yield family


class _NotificationQueue(_StoreCollector):
    """The outbox rows not sent yet, and the age of the oldest: a stuck target shows as an age
    that keeps growing."""

    name = "outcomewatch_notification_queue"

    def __init__(
        self, queue: Callable[[], tuple[int, datetime | None]], clock: Callable[[], datetime]
    ) -> None:
        super().__init__()
        self._queue = queue
        self._clock = clock

    def _families(self) -> Iterable[Metric]:
        pending, oldest = self._queue()
        age = 0.0 if oldest is None else max(0.0, (self._clock() - oldest).total_seconds())
        yield GaugeMetricFamily(
            "outcomewatch_notifications_pending",
            "Notifications (outbox rows) not delivered yet: pending or failed and retrying.",
            value=pending)
        yield GaugeMetricFamily(
            "outcomewatch_notification_queue_oldest_age_seconds",
            "Age of the oldest notification not delivered yet (0 when none is waiting).",
            value=age)


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
        self.runs_opened = Counter(
            "outcomewatch_runs_opened", "Runs opened (a trigger span matched), by rule.",
            ["rule"], registry=r)
        self.runs = Counter(
            "outcomewatch_runs", "Runs decided, by rule and verdict (passed, failed).",
            ["rule", "status"], registry=r)
        self.time_to_outcome = Histogram(
            "outcomewatch_time_to_outcome_seconds",
            "Server time from a run's opening (its trigger span received) to its verdict, by "
            "rule and verdict. 0 when the outcome spans were already there when the trigger "
            "arrived (children are exported before their parents).",
            ["rule", "status"], buckets=_OUTCOME_BUCKETS, registry=r)
        # labels() takes a lock and builds a key per call; these are called once per run.
        self._opened: dict[str, Counter] = {}
        self._decided: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self.late_outcomes = Counter(
            "outcomewatch_late_outcomes", "Outcomes that arrived after their run failed.",
            ["rule"], registry=r)
        self.evicted_traces = Counter(
            "outcomewatch_evicted_traces",
            "Live traces evaluated early because live state was over its budget.", registry=r)
        self.live_traces = Gauge(
            "outcomewatch_live_traces", "Traces held in memory with open runs or candidates.",
            registry=r)
        self.live_bytes = Gauge(
            "outcomewatch_live_bytes",
            "Estimated memory of the live state (traces, held spans, open runs), against "
            "--max-live-bytes.", registry=r)
        self.open_runs = Gauge(
            "outcomewatch_open_runs", "Runs waiting for their outcome.", registry=r)
        self.notifications = Counter(
            "outcomewatch_notifications",
            "Notification requests by target and result (sent, failed): outbox deliveries "
            "and re-sends of firing alerts.",
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
        self.reload_successful = Gauge(
            "outcomewatch_rules_last_reload_successful",
            "1 if the last rule (re)load succeeded, 0 if it was rejected (the previous rules "
            "stay).", registry=r)
        self.reload_success_timestamp = Gauge(
            "outcomewatch_rules_last_reload_success_timestamp_seconds",
            "Unix time of the last successful rule (re)load.", registry=r)
        self.build_info = Gauge(
            "outcomewatch_build_info", "Always 1; the running version as a label.",
            ["version"], registry=r)
        self.build_info.labels(__version__).set(1)

    # What the pipeline and the rule source report; the counters behind them are this module's.

    def run_opened(self, rule: str) -> None:
        child = self._opened.get(rule)
        if child is None:
            child = self._opened[rule] = self.runs_opened.labels(rule)
        child.inc()

    def run_decided(self, rule: str, status: str, seconds: float) -> None:
        """A verdict (``status`` passed or failed), ``seconds`` from the run's opening."""
        children = self._decided.get((rule, status))
        if children is None:
            children = self._decided[rule, status] = (
                self.runs.labels(rule, status), self.time_to_outcome.labels(rule, status))
        children[0].inc()
        children[1].observe(seconds)

    def rules_reloaded(self, *, ok: bool, at: float) -> None:
        """A rule (re)load finished (``ok``: accepted); ``at`` is unix seconds."""
        self.reload_successful.set(1 if ok else 0)
        if ok:
            self.reload_success_timestamp.set(at)

    def watch_open_incidents(self, count: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """``count()`` gives (rule, severity, open incidents); read at every scrape."""
        self.registry.register(_OpenIncidents(count))

    def watch_notification_queue(
        self, queue: Callable[[], tuple[int, datetime | None]], clock: Callable[[], datetime]
    ) -> None:
        """``queue()`` gives (rows not sent, when the oldest was written); read at every scrape,
        the age measured on ``clock``."""
        self.registry.register(_NotificationQueue(queue, clock))

    def render(self) -> bytes:
        """The text exposition; never raises for a failing store (see the module doc)."""
        return generate_latest(self.registry)
