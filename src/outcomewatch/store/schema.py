"""The DuckDB schema. Times are TIMESTAMPTZ (UTC) for runs and incidents, and unix nanoseconds
(BIGINT) for spans, as OTLP gives them.

``spans`` is append-only: a retried export stores a span twice, so reads de-duplicate by
(trace_id, span_id). ``span`` is the serialised OTLP protobuf Span: it keeps attributes, events
and links without decoding them at ingest (see outcomewatch.otlp). No PRIMARY KEY on spans: it
would cost 20-30% of insert speed and duplicates are harmless.

A resource (service.name, service.version, host.name, ...) is shared by every span of a process,
so it is stored once in ``resources``, keyed by a hash of its serialised bytes; storing it with
every span halved the insert rate.
"""

import duckdb

SCHEMA_VERSION = 2

DDL = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);

-- true while a server has the file open (checkpointed at open, false at a clean stop): a copy
-- that says true and has no .wal beside it lacks the newest data (replay refuses it).
CREATE TABLE IF NOT EXISTS server_state (running BOOLEAN NOT NULL);

CREATE TABLE IF NOT EXISTS spans (
    trace_id VARCHAR NOT NULL,
    span_id VARCHAR NOT NULL,
    parent_span_id VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    service VARCHAR NOT NULL,
    scope VARCHAR NOT NULL,
    kind TINYINT NOT NULL,
    start_ns BIGINT NOT NULL,
    end_ns BIGINT NOT NULL,
    status_code TINYINT NOT NULL,
    status_message VARCHAR NOT NULL,
    received_ns BIGINT NOT NULL,
    span BLOB NOT NULL,
    resource_id BIGINT NOT NULL
);

-- Where a trace's spans are: the window of received_ns they were stored in, so a lookup reads
-- only the row groups of that window (spans are appended in received order) instead of scanning
-- the whole table. Append-only (a trace may have several rows: its window is min..max), written
-- by the writer about twice a second for the spans committed since; the spans received after
-- the newest row (the last moment's) are found by a scan of that short tail. Derived data: a
-- start rebuilds what a crash lost from the spans.
CREATE TABLE IF NOT EXISTS trace_index (
    trace_id VARCHAR NOT NULL,
    first_received_ns BIGINT NOT NULL,
    last_received_ns BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS trace_index_trace ON trace_index (trace_id);
-- One row: max(trace_index.last_received_ns), kept by whoever appends to trace_index (a read of
-- it costs a scan of the whole table). Rebuilt at every open (reindex_tail).
CREATE TABLE IF NOT EXISTS trace_index_state (indexed_until BIGINT);

-- One row: every span received before ``observed_before_ns`` has been observed by the engine and
-- what it decided from it (runs opened, verdicts) is stored; written with each verdict batch
-- (pipeline.py). A restart reads the spans again from there, not from a guess of how far the
-- verdict writes may have lagged behind the spans. NULL: no batch has said yet (read them all).
CREATE TABLE IF NOT EXISTS verdict_state (observed_before_ns BIGINT);

CREATE TABLE IF NOT EXISTS resources (
    id BIGINT PRIMARY KEY,
    resource BLOB NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    id VARCHAR PRIMARY KEY,
    rule VARCHAR NOT NULL,
    trace_id VARCHAR NOT NULL,
    trigger_span_id VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    opened_at TIMESTAMPTZ NOT NULL,
    deadline_at TIMESTAMPTZ,
    closed_at TIMESTAMPTZ,
    reason VARCHAR,
    missing VARCHAR[] NOT NULL DEFAULT [],
    incident_id BIGINT,
    group_key VARCHAR NOT NULL DEFAULT '',
    -- Outcomes that arrived after the verdict: recorded, never erasing the failure.
    late_outcomes VARCHAR[] NOT NULL DEFAULT [],
    late_at TIMESTAMPTZ,
    -- Spans that matched an expectation's span/service but not its other conditions, while the
    -- run was open: a JSON list of {"name", "status_message"} (see MIGRATIONS).
    at_risk JSON NOT NULL DEFAULT '[]'
);

CREATE SEQUENCE IF NOT EXISTS incident_ids START 1;

CREATE TABLE IF NOT EXISTS incidents (
    id BIGINT PRIMARY KEY DEFAULT nextval('incident_ids'),
    rule VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    severity VARCHAR NOT NULL,
    owner VARCHAR NOT NULL,
    route VARCHAR NOT NULL,
    opened_at TIMESTAMPTZ NOT NULL,
    last_failure_at TIMESTAMPTZ NOT NULL,
    failure_count INTEGER NOT NULL,
    summary VARCHAR NOT NULL,
    resolved_at TIMESTAMPTZ,
    description VARCHAR NOT NULL DEFAULT '',
    -- One open incident per rule and group: group_key is the JSON of the group_by values.
    group_key VARCHAR NOT NULL DEFAULT '',
    acknowledged_at TIMESTAMPTZ,
    -- The latest opening or re-opening: alerts of this firing episode start here.
    episode_started_at TIMESTAMPTZ
);

-- The incident's timeline: every transition, who made it, when and why.
CREATE TABLE IF NOT EXISTS incident_events (
    incident_id BIGINT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    kind VARCHAR NOT NULL,
    actor VARCHAR NOT NULL,
    comment VARCHAR
);

-- Scheduled rules: the time up to which slots have been judged, so a restart neither forgets
-- nor double-counts a missed slot.
CREATE TABLE IF NOT EXISTS schedule_state (
    rule VARCHAR PRIMARY KEY,
    judged_until TIMESTAMPTZ NOT NULL
);

-- Flap control: consecutive verdicts per rule and group.
CREATE TABLE IF NOT EXISTS rule_state (
    rule VARCHAR NOT NULL,
    group_key VARCHAR NOT NULL,
    consecutive_failures INTEGER NOT NULL,
    consecutive_passes INTEGER NOT NULL,
    -- Run ids of the current failure streak not attached to any incident yet (open_after).
    held VARCHAR[] NOT NULL DEFAULT [],
    PRIMARY KEY (rule, group_key)
);

-- Transactional outbox: one row per transition and notification target, written in the same
-- transaction as the transition; the notifier claims and sends them.
CREATE SEQUENCE IF NOT EXISTS outbox_ids START 1;
CREATE TABLE IF NOT EXISTS outbox (
    id BIGINT PRIMARY KEY DEFAULT nextval('outbox_ids'),
    incident_id BIGINT NOT NULL,
    transition VARCHAR NOT NULL,
    target VARCHAR NOT NULL,
    route VARCHAR NOT NULL,
    payload JSON NOT NULL,
    status VARCHAR NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    sent_at TIMESTAMPTZ,
    last_error VARCHAR
);

-- The search index: trigger attribute values of each run (and evidence values of failed runs),
-- written with the run, so "what happened to customer X?" never decodes a span.
CREATE TABLE IF NOT EXISTS run_keys (
    run_id VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    value VARCHAR NOT NULL
);
CREATE INDEX IF NOT EXISTS run_keys_value ON run_keys (value);

-- One row per failed run. incident_id is NULL while flap control (open_after) holds the
-- incident back; the failures are attached when it opens. ``detail`` is JSON:
-- {"error_spans": [{"name", "service", "span_id", "status_message",
--                   "exceptions": [{"type", "message", "stacktrace"}]}],
--  "evidence": {key: value}, "resource": {key: value}, "trigger": {span fields + attributes},
--  "duration_ms": float}
CREATE TABLE IF NOT EXISTS incident_failures (
    incident_id BIGINT,
    run_id VARCHAR NOT NULL,
    rule VARCHAR NOT NULL,
    trace_id VARCHAR NOT NULL,
    failed_at TIMESTAMPTZ NOT NULL,
    reason VARCHAR NOT NULL,
    missing VARCHAR[] NOT NULL,
    detail JSON NOT NULL,
    group_key VARCHAR NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS incident_failures_incident ON incident_failures (incident_id);
"""

# Files written by an earlier version: columns and tables added since, and the traces table
# filled once from the stored spans. Each statement is idempotent.
MIGRATIONS = (
    "ALTER TABLE incidents ADD COLUMN IF NOT EXISTS episode_started_at TIMESTAMPTZ",
    "ALTER TABLE rule_state ADD COLUMN IF NOT EXISTS held VARCHAR[] DEFAULT []",
    # duckdb refuses NOT NULL with ADD COLUMN IF NOT EXISTS: on such files the column is
    # nullable, and readers take NULL as [].
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS at_risk JSON DEFAULT '[]'",
    # A new file: NULL. A file from before verdict_state: what the versions before it assumed,
    # that everything stored had been observed (they read an idle time back from the last span).
    "INSERT INTO verdict_state SELECT (SELECT max(received_ns) FROM spans) "
    "WHERE NOT EXISTS (SELECT * FROM verdict_state)",
)

# Index rows for the spans received since ``$since`` (the tail a crash may have left
# unindexed, with a margin: duplicates only repeat a window).
BACKFILL_TRACES = """
INSERT INTO trace_index
SELECT trace_id, min(received_ns), max(received_ns) FROM spans WHERE received_ns >= $since
GROUP BY trace_id
"""
INDEXED_UNTIL = "SELECT max(last_received_ns) FROM trace_index"
REINDEX_MARGIN_NS = 10 * 1_000_000_000


def reindex_tail(db: duckdb.DuckDBPyConnection) -> None:
    """Index the spans a crash left unindexed, and set trace_index_state (called at open)."""
    [(until,)] = db.execute(INDEXED_UNTIL).fetchall()
    since = -(2**63) if until is None else int(until) - REINDEX_MARGIN_NS
    db.execute(BACKFILL_TRACES, {"since": since})
    db.execute("DELETE FROM trace_index_state")
    db.execute(f"INSERT INTO trace_index_state {INDEXED_UNTIL}")


def migrate(db: duckdb.DuckDBPyConnection) -> None:
    """Bring a file of any earlier version to SCHEMA_VERSION (after DDL, on every open: each
    step is idempotent)."""
    for statement in MIGRATIONS:
        db.execute(statement)
    [(version,)] = db.execute("SELECT max(version) FROM schema_version").fetchall()
    if version is None:
        db.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
        return
    if version < SCHEMA_VERSION:
        db.execute("UPDATE incidents SET episode_started_at = opened_at "
                   "WHERE episode_started_at IS NULL")
        db.execute("UPDATE schema_version SET version = ?", [SCHEMA_VERSION])
