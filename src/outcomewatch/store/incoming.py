"""The Arrow tables the verdict path hands DuckDB: their schemas (the columns of the stored
tables they are inserted into or joined with, store/schema.py) and how they are registered on
the writer's cursor for one statement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")
RUNS = pa.schema([
    ("id", pa.string()), ("rule", pa.string()), ("trace_id", pa.string()),
    ("trigger_span_id", pa.string()), ("status", pa.string()), ("opened_at", TS),
    ("deadline_at", TS), ("closed_at", TS), ("reason", pa.string()),
    ("missing", pa.list_(pa.string())), ("group_key", pa.string()),
])
KEYS = pa.schema([("run_id", pa.string()), ("key", pa.string()), ("value", pa.string())])
GROUPS = pa.schema([("rule", pa.string()), ("group_key", pa.string())])
STATES = pa.schema([
    ("rule", pa.string()), ("group_key", pa.string()), ("consecutive_failures", pa.int32()),
    ("consecutive_passes", pa.int32()), ("held", pa.list_(pa.string())),
])
INCIDENTS = pa.schema([
    ("id", pa.int64()), ("rule", pa.string()), ("status", pa.string()),
    ("severity", pa.string()), ("owner", pa.string()), ("route", pa.string()),
    ("opened_at", TS), ("last_failure_at", TS), ("failure_count", pa.int32()),
    ("summary", pa.string()), ("resolved_at", TS), ("description", pa.string()),
    ("group_key", pa.string()), ("acknowledged_at", TS), ("episode_started_at", TS),
])
FAILURES = pa.schema([
    ("incident_id", pa.int64()), ("run_id", pa.string()), ("rule", pa.string()),
    ("trace_id", pa.string()), ("failed_at", TS), ("reason", pa.string()),
    ("missing", pa.list_(pa.string())), ("detail", pa.string()), ("group_key", pa.string()),
])
EVENTS = pa.schema([
    ("incident_id", pa.int64()), ("occurred_at", TS), ("kind", pa.string()),
    ("actor", pa.string()), ("comment", pa.string()),
])
OUTBOX = pa.schema([
    ("incident_id", pa.int64()), ("transition", pa.string()), ("target", pa.string()),
    ("route", pa.string()), ("payload", pa.string()), ("created_at", TS),
])
ATTACHED = pa.schema([("run_id", pa.string()), ("incident_id", pa.int64())])
LATE = pa.schema([("id", pa.string()), ("outcomes", pa.list_(pa.string())), ("at", TS)])
AT_RISK = pa.schema([("id", pa.string()), ("at_risk", pa.string())])


def table(db: duckdb.DuckDBPyConnection, name: str, rows: list[dict[str, Any]],
           schema: pa.Schema) -> None:
    db.register(name, pa.Table.from_pylist(rows, schema=schema))


@dataclass
class Keys:
    """run_keys rows, column by column: a run has up to MAX_SEARCH_KEYS of them, so a batch
    has ten times more keys than runs, and a dict per row would cost more than the rest."""

    run_id: list[str] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    value: list[str] = field(default_factory=list)

    def add(self, run_id: str, pairs: Sequence[tuple[str, str]]) -> None:
        self.run_id += [run_id] * len(pairs)
        self.key += [k for k, _ in pairs]
        self.value += [v for _, v in pairs]

    def __bool__(self) -> bool:
        return bool(self.run_id)

    def register(self, db: duckdb.DuckDBPyConnection, name: str) -> None:
        db.register(name, pa.Table.from_arrays([self.run_id, self.key, self.value],
                                               schema=KEYS))


def unregister(db: duckdb.DuckDBPyConnection, *names: str) -> None:
    for name in names:
        db.unregister(name)
