"""Outcomes that live in another trace: for ``suggest``'s ``correlate``.

A workflow's outcome may be the work of another workflow start (a queue consumer, a job) in a
trace of its own, tied to the first either by an OTel span link or by an id attribute both
carry. Attributes and links are only in the span blobs, so this is the one place ``suggest``
decodes spans, and only a bounded sample: the ``SAMPLE`` newest start spans of each workflow
(trigger and candidate outcome), whatever the number stored. Which traces a link points into is
then asked of DuckDB.

For a trigger T and another start W, over the samples:

- *linked*: the share of W's spans with a link into a trace T anchors;
- *shared key* k: the share of T's spans whose value of k some W span carries (string and
  integer values; keys that look like ids first on ties).

A T span's outcome is the W span linked to its trace, else the one sharing its value of the key,
and only if it starts at or after the T span (else W is the cause, not the outcome).

W is T's outcome when either share reaches ``SHARE``. The figures reported for it (missing
share, status mix, delays from T's start to W's end) are over the sampled T spans.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass

import duckdb
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from outcomewatch.offline.suggest_sql import CONSUMER_KIND, SERVER_KIND, Workflow

SAMPLE = 500
SHARE = 0.5
# One scan for every workflow's sample: the newest SAMPLE start spans per (name, service).
_SAMPLE_SQL = (
    "SELECT name, service, trace_id, span FROM ("
    " SELECT s.name, s.service, s.trace_id, s.span, row_number() OVER ("
    "  PARTITION BY s.name, s.service ORDER BY s.received_ns DESC) AS rank"
    " FROM spans s JOIN (SELECT unnest(?) AS name, unnest(?) AS service) w"
    " ON s.name = w.name AND s.service = w.service"
    " WHERE s.received_ns >= ? AND (s.parent_span_id = '' OR s.kind IN"
    f" ({SERVER_KIND}, {CONSUMER_KIND}))) WHERE rank <= ?"
)
_ANCHORED_SQL = (
    "SELECT DISTINCT trace_id FROM spans WHERE received_ns >= ? AND name = ? AND service = ? "
    "AND list_contains(?, trace_id)"
)


@dataclass(frozen=True)
class Sampled:
    trace_id: str
    start_ns: int
    end_ns: int
    status: int
    values: dict[str, str | int]
    links: tuple[str, ...]


@dataclass(frozen=True)
class Correlation:
    """``other``'s start is ``trigger``'s outcome, in another trace; ``by`` is the key to
    correlate on (for links only: an id-like key of the trigger, which a rule must name)."""

    trigger: Workflow
    other: Workflow
    by: str
    linked_share: float
    matched: int  # sampled trigger spans whose outcome was found
    sampled: int  # sampled trigger spans
    status: dict[str, int]  # of the matched outcomes: ok / error / unset
    delays_s: tuple[float, ...]  # of the matched outcomes: trigger start to outcome end


def _samples(conn: duckdb.DuckDBPyConnection, workflows: list[Workflow], since_ns: int
             ) -> dict[tuple[str, str], list[Sampled]]:
    rows = conn.execute(_SAMPLE_SQL, [[w.name for w in workflows],
                                      [w.service for w in workflows], since_ns, SAMPLE])
    found: dict[tuple[str, str], list[Sampled]] = {(w.name, w.service): [] for w in workflows}
    for name, service, trace_id, raw in rows.fetchall():
        span = PbSpan.FromString(bytes(raw))
        values: dict[str, str | int] = {}
        for attribute in span.attributes:
            kind = attribute.value.WhichOneof("value")
            if kind == "string_value":
                values[attribute.key] = attribute.value.string_value
            elif kind == "int_value":
                values[attribute.key] = attribute.value.int_value
        found[(str(name), str(service))].append(Sampled(
            str(trace_id), span.start_time_unix_nano, span.end_time_unix_nano,
            span.status.code, values, tuple(link.trace_id.hex() for link in span.links)))
    return found


def _id_like(key: str) -> bool:
    return key == "id" or key.endswith((".id", "_id"))


def _pairs(trigger: list[Sampled], other: list[Sampled], linked: set[str]
           ) -> tuple[str | None, dict[int, Sampled], float]:
    """The key to correlate by, the matched trigger samples (index -> outcome), linked share."""
    by_link: dict[str, Sampled] = {}
    for span in other:
        for target in span.links:
            if target in linked:
                by_link.setdefault(target, span)
    linked_share = sum(any(t in linked for t in s.links) for s in other) / len(other)
    by_value: dict[tuple[str, str | int], Sampled] = {}
    for span in other:
        for key, value in span.values.items():
            by_value.setdefault((key, value), span)
    shared: Counter[str] = Counter()
    for span in trigger:
        for key, value in span.values.items():
            if (key, value) in by_value:
                shared[key] += 1
    best = max(shared, key=lambda k: (shared[k], _id_like(k), k), default=None)
    if best is not None and shared[best] < SHARE * len(trigger):
        best = None
    matched: dict[int, Sampled] = {}
    for index, span in enumerate(trigger):
        outcome = by_link.get(span.trace_id)
        if outcome is None and best is not None and best in span.values:
            outcome = by_value.get((best, span.values[best]))
        # An outcome comes after its trigger: the other direction is the job's own cause.
        if outcome is not None and outcome.start_ns >= span.start_ns:
            matched[index] = outcome
    if best is None and linked_share >= SHARE:
        keys: Counter[str] = Counter(k for s in trigger for k in s.values if _id_like(k))
        best = max(keys, key=lambda k: (keys[k], k), default=None)
    return best, matched, linked_share


def correlations(conn: duckdb.DuckDBPyConnection, workflows: list[Workflow], since_ns: int
                 ) -> list[Correlation]:
    """For each workflow, the other workflow starts that are its outcome in another trace.
    Raises duckdb.Error when the spans cannot be read."""
    if not workflows:
        return []
    samples = _samples(conn, workflows, since_ns)
    found = []
    for trigger in workflows:
        trigger_spans = samples[(trigger.name, trigger.service)]
        followers = {(f.name, f.service) for f in trigger.followers}
        if not trigger_spans:
            continue
        for other in workflows:
            key = (other.name, other.service)
            other_spans = samples[key]
            if other is trigger or key in followers or not other_spans:
                continue
            targets = sorted({t for s in other_spans for t in s.links})
            linked = {str(r[0]) for r in conn.execute(
                _ANCHORED_SQL, [since_ns, trigger.name, trigger.service, targets]).fetchall()
            } if targets else set()
            by, matched, linked_share = _pairs(trigger_spans, other_spans, linked)
            if by is None or len(matched) < SHARE * len(trigger_spans):
                continue
            status: defaultdict[str, int] = defaultdict(int)
            for outcome in matched.values():
                status[{1: "ok", 2: "error"}.get(outcome.status, "unset")] += 1
            delays = tuple((o.end_ns - trigger_spans[i].start_ns) / 1e9
                           for i, o in matched.items())
            found.append(Correlation(trigger, other, by, round(linked_share, 4), len(matched),
                                     len(trigger_spans), dict(status), delays))
    return found


def quantile(values: tuple[float, ...], q: float) -> float:
    """The ``q`` quantile (linear, as DuckDB's quantile_cont) of ``values``."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]
