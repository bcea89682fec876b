"""The command line: the only place that reads argv.

    outcomewatch serve [--rules PATH ...] [--db FILE] [--grpc HOST:PORT] [--http HOST:PORT]
                       [--api HOST:PORT] [--trace-idle DURATION] [--max-live-bytes SIZE] ...
    outcomewatch check PATH ... [--format text|json]
    outcomewatch schema
    outcomewatch test FILE...
    outcomewatch replay --rules PATH [--rules PATH ...] [--db FILE] [--since DURATION]
                        [--trace-idle DURATION] [--format text|json]
    outcomewatch demo [--db FILE] [--grpc HOST:PORT] [--http HOST:PORT] [--api HOST:PORT]
                      [--rules DIR] [--every DURATION]
    outcomewatch suggest (--db FILE | --api URL) [--since DURATION] [--trigger GLOB]
                         [--min-traces N] [--format text|yaml|json]
    outcomewatch --version
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from outcomewatch import __version__
from outcomewatch.cli_args import (
    address_arg,
    default_live_bytes,
    duration_arg,
    positive_int_arg,
    retention_arg,
    size_arg,
    workers_arg,
)
from outcomewatch.errors import RuleError, StoreError

if TYPE_CHECKING:
    from outcomewatch.offline import ReplayReport
    from outcomewatch.server import Server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outcomewatch", description="Did the customer-visible outcome actually happen?"
    )
    parser.add_argument("--version", action="version", version=f"outcomewatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="receive OTLP spans and evaluate outcome rules")
    serve.add_argument("--rules", action="append", metavar="PATH",
                       help="rule file or directory (repeatable; default: rules/)")
    serve.add_argument("--db", default="data/outcomewatch.duckdb", metavar="FILE",
                       help="DuckDB file (default: data/outcomewatch.duckdb)")
    serve.add_argument("--grpc", type=address_arg, default=("127.0.0.1", 4317),
                       metavar="HOST:PORT",
                       help="OTLP/gRPC listen address (default 127.0.0.1:4317)")
    serve.add_argument("--http", type=address_arg, default=("127.0.0.1", 4318),
                       metavar="HOST:PORT",
                       help="OTLP/HTTP listen address (default 127.0.0.1:4318)")
    serve.add_argument("--api", type=address_arg, default=("127.0.0.1", 8080),
                       metavar="HOST:PORT",
                       help="query API listen address (default 127.0.0.1:8080)")
    serve.add_argument("--trace-idle", type=duration_arg, default=timedelta(seconds=10),
                       metavar="DURATION",
                       help="a trace is complete after this long without a new span (default 10s)")
    serve.add_argument("--config", metavar="FILE",
                       help="notification routes and incident settings (YAML); see README")
    serve.add_argument("--api-token", default=os.environ.get("OUTCOMEWATCH_API_TOKEN"),
                       metavar="TOKEN",
                       help="bearer token required for API writes (env OUTCOMEWATCH_API_TOKEN)")
    serve.add_argument("--api-read-token",
                       default=os.environ.get("OUTCOMEWATCH_API_READ_TOKEN"), metavar="TOKEN",
                       help="bearer token required for API reads "
                            "(env OUTCOMEWATCH_API_READ_TOKEN; the write token also reads)")
    serve.add_argument("--otlp-token", default=os.environ.get("OUTCOMEWATCH_OTLP_TOKEN"),
                       metavar="TOKEN",
                       help="bearer token OTLP clients must send (env OUTCOMEWATCH_OTLP_TOKEN)")
    serve.add_argument("--tls-cert", metavar="FILE",
                       help="PEM certificate chain: serve gRPC, HTTP and the API over TLS")
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    serve.add_argument("--max-queue", type=positive_int_arg, default=1024, metavar="N",
                       help="exports queued for the database before new ones are refused with "
                            "UNAVAILABLE / 503 + Retry-After (default 1024)")
    serve.add_argument("--decode-workers", type=workers_arg, default="auto", metavar="N",
                       help="processes that decode OTLP/protobuf exports beside the server's "
                            "own; 0 decodes in the server's process (default auto: one per usable "
                            "CPU beyond the first, at most 4)")
    serve.add_argument("--retention", type=retention_arg, default=timedelta(days=14),
                       metavar="DURATION",
                       help="keep spans of traces whose runs all passed (or that opened none) "
                            "this long; 'forever' keeps them (default 14d)")
    serve.add_argument("--evidence-retention", type=retention_arg, default=timedelta(days=90),
                       metavar="DURATION",
                       help="keep spans of traces with a failed run (incident evidence) this "
                            "long; incidents themselves are kept (default 90d)")
    serve.add_argument("--retention-interval", type=duration_arg,
                       default=timedelta(minutes=10), metavar="DURATION",
                       help="how often expired spans are deleted (default 10m)")
    serve.add_argument("--max-live-traces", type=positive_int_arg, metavar="N",
                       help="live traces held in memory; over it the oldest are evaluated "
                            "early (reason evicted) and counted, never dropped silently")
    serve.add_argument("--max-live-spans", type=positive_int_arg, metavar="N",
                       help="spans held in memory for open runs (a memory budget), likewise")
    serve.add_argument("--max-live-bytes", type=size_arg, metavar="SIZE",
                       help="estimated memory of live traces, held spans and open runs "
                            "(512MiB, 2GB), likewise (default: a quarter of the machine's or "
                            "the cgroup's memory, at least 64MiB)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])

    check = commands.add_parser(
        "check", help="validate rule files; print one file:line:column: error per problem"
    )
    check.add_argument("paths", nargs="+", metavar="PATH", help="rule file or directory")
    check.add_argument("--format", choices=["text", "json"], default="text",
                       help="text: one problem per line; json: {problems, rules} (default text)")

    commands.add_parser("schema", help="print the JSON Schema of a rule file (for editors)")

    test = commands.add_parser(
        "test", help="run rule unit tests (YAML: rule files, input spans, expected runs)")
    test.add_argument("files", nargs="+", metavar="FILE", help="rule test file")

    replay = commands.add_parser(
        "replay", help="evaluate rules against stored spans (read-only): runs and incidents")
    replay.add_argument("--rules", action="append", metavar="PATH", required=True,
                        help="rule file or directory (repeatable)")
    replay.add_argument("--db", default="data/outcomewatch.duckdb", metavar="FILE",
                        help="DuckDB file, opened read-only (default: data/outcomewatch.duckdb)")
    replay.add_argument("--api", metavar="URL",
                        help="backtest in a running server instead (its POST /api/v1/replay, on "
                             "its own stored spans, while it ingests); --db is then ignored")
    replay.add_argument("--api-token", default=os.environ.get("OUTCOMEWATCH_API_TOKEN"),
                        metavar="T", help="the server's API write token (default: "
                                          "$OUTCOMEWATCH_API_TOKEN)")
    replay.add_argument("--since", type=duration_arg, metavar="DURATION",
                        help="only spans received this long ago or later (default: all)")
    replay.add_argument("--trace-idle", type=duration_arg, default=timedelta(seconds=10),
                        metavar="DURATION", help="as for serve (default 10s)")
    replay.add_argument("--format", choices=["text", "json"], default="text")

    demo = commands.add_parser(
        "demo", help="serve the example rules on a short clock and play the seed stories")
    demo.add_argument("--db", metavar="FILE",
                      help="DuckDB file (default: a fresh data/demo/outcomewatch.duckdb)")
    demo.add_argument("--grpc", type=address_arg, default=("127.0.0.1", 4317),
                      metavar="HOST:PORT", help="OTLP/gRPC listen address (default 127.0.0.1:4317)")
    demo.add_argument("--http", type=address_arg, default=("127.0.0.1", 4318),
                      metavar="HOST:PORT", help="OTLP/HTTP listen address (default 127.0.0.1:4318)")
    demo.add_argument("--api", type=address_arg, default=("127.0.0.1", 8080),
                      metavar="HOST:PORT", help="console and API address (default 127.0.0.1:8080)")
    demo.add_argument("--rules", default="rules/examples", metavar="DIR",
                      help="rules to copy with every `within` scaled down (default rules/examples)")
    demo.add_argument("--every", type=duration_arg, default=timedelta(seconds=30),
                      metavar="DURATION", help="how often the stories play again (default 30s)")
    demo.add_argument("--log-level", default="warning",
                      choices=["debug", "info", "warning", "error"])

    suggest = commands.add_parser(
        "suggest", help="propose outcome rules from stored traces, each with its backtest")
    source = suggest.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", metavar="FILE", help="DuckDB file, opened read-only")
    source.add_argument("--api", metavar="URL",
                        help="a running server's API (GET /api/v1/suggestions), like "
                             "http://127.0.0.1:8080")
    suggest.add_argument("--since", type=duration_arg, default=timedelta(days=7),
                         metavar="DURATION", help="spans received this long ago or later "
                                                  "(default 7d)")
    suggest.add_argument("--trigger", default="*", metavar="GLOB",
                         help="only workflow starts whose span name matches (default *)")
    suggest.add_argument("--min-traces", type=positive_int_arg, default=20, metavar="N",
                         help="only workflow starts seen in at least N traces (default 20)")
    suggest.add_argument("--format", choices=["text", "yaml", "json"], default="text",
                         help="yaml: a rule file `outcomewatch check` accepts (default text)")
    suggest.add_argument("--trace-idle", type=duration_arg, default=timedelta(seconds=10),
                         metavar="DURATION", help="for the backtest, as for serve (default 10s)")
    suggest.add_argument("--api-token", metavar="TOKEN",
                         default=os.environ.get("OUTCOMEWATCH_API_READ_TOKEN")
                         or os.environ.get("OUTCOMEWATCH_API_TOKEN"),
                         help="bearer token for --api (env OUTCOMEWATCH_API_READ_TOKEN or "
                              "OUTCOMEWATCH_API_TOKEN)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from outcomewatch import lograte
    from outcomewatch.listeners import Address
    from outcomewatch.server import Server, Settings

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    max_live_bytes = args.max_live_bytes or default_live_bytes()  # logged at start
    lograte.install()  # one line per second per kind of repeated warning or error
    settings = Settings(
        rules=tuple(args.rules or ["rules"]),
        db=args.db,
        grpc=Address(*args.grpc),
        http=Address(*args.http),
        api=Address(*args.api),
        trace_idle=args.trace_idle,
        config=args.config,
        api_token=args.api_token or None,
        api_read_token=args.api_read_token or None,
        otlp_token=args.otlp_token or None,
        max_live_traces=args.max_live_traces,
        max_live_spans=args.max_live_spans,
        max_live_bytes=max_live_bytes,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_queue=args.max_queue,
        decode_workers=args.decode_workers,
        retention=args.retention,
        evidence_retention=args.evidence_retention,
        retention_interval=args.retention_interval,
    )
    if bool(args.tls_cert) != bool(args.tls_key):
        print("outcomewatch: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        _probe_listeners(args)
        server = Server(settings)
        asyncio.run(_run_server(server))
    except RuleError as exc:
        print(exc, file=sys.stderr)
        print(f"outcomewatch: {len(exc.problems)} error(s) in rule or config files",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"outcomewatch: {_listener_error(args, exc)}", file=sys.stderr)
        return 1
    except (StoreError, ValueError) as exc:  # ValueError: e.g. a token no client can send
        print(f"outcomewatch: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run_server(server: Server) -> None:
    """Run until signalled; a start that fails half-way (a port in use) first stops what did
    start, inside the loop: a gRPC server left running would be collected after the loop
    closed and print "Event loop is closed" and "coroutine was never awaited" tracebacks."""
    try:
        await server.run_until_signalled()
    except BaseException:
        with contextlib.suppress(Exception):  # the start's own error is the one to report
            await server.stop()
        raise


_LISTENERS = (("grpc", "OTLP/gRPC"), ("http", "OTLP/HTTP"), ("api", "API"))


def _probe_listeners(args: argparse.Namespace) -> None:
    """Raise BindError for a listener address already taken, before anything starts (and
    logs that it listens): the person sees the one line that matters. A port taken after
    this probe still fails the start, with the same line."""
    from outcomewatch.listeners import Address, bind

    for flag, _ in _LISTENERS:
        address = Address(*getattr(args, flag))
        if address.port != 0:
            bind(address).close()


def _listener_error(args: argparse.Namespace, exc: OSError) -> str:
    """``exc`` in one line, naming the listener (flag and address) it came from, if any."""
    from outcomewatch.listeners import Address, BindError

    text = str(exc)
    for flag, label in _LISTENERS:
        address = str(Address(*getattr(args, flag)))
        if isinstance(exc, BindError) and str(exc.address) != address:
            continue
        if isinstance(exc, BindError) or address in text:
            reason = exc.reason if isinstance(exc, BindError) else (
                os.strerror(exc.errno) if exc.errno else "address in use or not available")
            return f"cannot listen on {address} for the {label} listener (--{flag}): {reason}"
    return text


def _check(args: argparse.Namespace) -> int:
    """Exit 1 if any rule file has a problem, else 0; problems go to stdout, a summary to stderr."""
    from outcomewatch.rules import check_rules

    rules, problems = check_rules(args.paths)
    if args.format == "json":
        report = {
            "problems": [
                {"file": p.file, "line": p.line, "column": p.column, "message": p.message}
                for p in problems
            ],
            "rules": len(rules),
        }
        print(json.dumps(report, indent=2))
    else:
        for problem in problems:
            print(problem)
    if problems:
        print(f"{len(problems)} error(s)", file=sys.stderr)
        return 1
    print(f"ok: {len(rules)} rule(s)", file=sys.stderr)
    return 0


def _schema() -> int:
    from outcomewatch.rules import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _test(args: argparse.Namespace) -> int:
    """Exit 0 when every case of every file passes, else 1; ``N passed, M failed`` comes last."""
    from outcomewatch.offline import run_test_files

    return run_test_files(args.files, sys.stdout)


def _replay(args: argparse.Namespace) -> int:
    import time

    from outcomewatch.offline import render_replay, replay
    from outcomewatch.rules import load_rules

    try:
        rules = load_rules(args.rules)
    except RuleError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.api:
        return _replay_api(args)
    since_ns = None
    if args.since is not None:
        since_ns = time.time_ns() - int(args.since.total_seconds() * 1e9)
    try:
        report = replay(rules, args.db, since_ns=since_ns, idle=args.trace_idle)
    except StoreError as exc:
        print(f"outcomewatch: {exc}", file=sys.stderr)
        return 1
    print(render_replay(report, args.format))
    return 0


def _replay_api(args: argparse.Namespace) -> int:
    """replay --api: the rule files (already checked here) to a running server's backtest."""
    from outcomewatch.offline import render_replay
    from outcomewatch.offline.replay_client import ReplayClientError, backtest_remote

    try:
        report = backtest_remote(args.api, args.rules, since=args.since,
                                 trace_idle=args.trace_idle, token=args.api_token)
    except ReplayClientError as exc:
        print(f"outcomewatch: {exc}", file=sys.stderr)
        return 1
    print(render_replay(report, args.format))
    return 0


def _demo(args: argparse.Namespace) -> int:

    from outcomewatch import demo
    from outcomewatch.listeners import Address
    from outcomewatch.server import Server, Settings

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = Path(args.rules)
    if not source.is_dir():
        print(f"outcomewatch: {source} is not a directory of rules (run from the repository, or "
              "pass --rules rules/examples)", file=sys.stderr)
        return 2
    db = Path(args.db) if args.db else demo.fresh_db(Path("data/demo/outcomewatch.duckdb"))
    rules = demo.prepare_rules(source, db.parent / "demo-rules")
    settings = Settings(rules=(str(rules),), db=str(db), grpc=Address(*args.grpc),
                        http=Address(*args.http), api=Address(*args.api),
                        trace_idle=demo.TRACE_IDLE)
    try:
        server = Server(settings)
        asyncio.run(demo.run(server, api_host=args.api[0], grpc_host=args.grpc[0],
                             out=sys.stdout, every=args.every))
    except RuleError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (StoreError, OSError, ValueError) as exc:
        print(f"outcomewatch: {exc}", file=sys.stderr)
        return 1
    return 0


def _suggest(args: argparse.Namespace) -> int:
    import time

    from outcomewatch.offline.suggest import render

    if args.api is not None:
        from outcomewatch.offline.suggest_client import SuggestClientError, fetch_suggestions

        try:
            report = fetch_suggestions(
                args.api, since=args.since, trigger=args.trigger, min_traces=args.min_traces,
                token=args.api_token)
        except SuggestClientError as exc:
            print(f"outcomewatch: {exc}", file=sys.stderr)
            return 1
        print(render(report, args.format))
        return 0

    from outcomewatch.offline import replay
    from outcomewatch.offline.suggest import suggest_file
    from outcomewatch.rules import RuleSet

    since_ns = time.time_ns() - int(args.since.total_seconds() * 1e9)

    def backtest(rules: RuleSet) -> ReplayReport:
        return replay(rules, args.db, since_ns=since_ns, idle=args.trace_idle)

    try:
        report = suggest_file(args.db, since_ns=since_ns, trigger=args.trigger,
                              min_traces=args.min_traces, backtest=backtest)
    except StoreError as exc:
        print(f"outcomewatch: {exc}", file=sys.stderr)
        return 1
    print(render(report, args.format))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "schema":
        return _schema()
    if args.command == "test":
        return _test(args)
    if args.command == "replay":
        return _replay(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "suggest":
        return _suggest(args)
    return _check(args)


if __name__ == "__main__":
    sys.exit(main())
