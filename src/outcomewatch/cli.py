"""The command line: the only place that reads argv.

    outcomewatch serve [--rules PATH ...] [--db FILE] [--grpc HOST:PORT] [--http HOST:PORT]
                       [--api HOST:PORT] [--trace-idle DURATION]
    outcomewatch check PATH ... [--format text|json]
    outcomewatch schema
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta

from outcomewatch.durations import parse_duration
from outcomewatch.errors import DurationError, RuleError, StoreError


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT``; raises ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid address {text!r}: expected HOST:PORT, like 127.0.0.1:4317")
    return host.strip("[]"), int(port)


def _address_arg(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _duration_arg(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outcomewatch", description="Did the customer-visible outcome actually happen?"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="receive OTLP spans and evaluate outcome rules")
    serve.add_argument("--rules", action="append", metavar="PATH",
                       help="rule file or directory (repeatable; default: rules/)")
    serve.add_argument("--db", default="data/outcomewatch.duckdb", metavar="FILE",
                       help="DuckDB file (default: data/outcomewatch.duckdb)")
    serve.add_argument("--grpc", type=_address_arg, default=("127.0.0.1", 4317),
                       metavar="HOST:PORT",
                       help="OTLP/gRPC listen address (default 127.0.0.1:4317)")
    serve.add_argument("--http", type=_address_arg, default=("127.0.0.1", 4318),
                       metavar="HOST:PORT",
                       help="OTLP/HTTP listen address (default 127.0.0.1:4318)")
    serve.add_argument("--api", type=_address_arg, default=("127.0.0.1", 8080),
                       metavar="HOST:PORT",
                       help="query API listen address (default 127.0.0.1:8080)")
    serve.add_argument("--trace-idle", type=_duration_arg, default=timedelta(seconds=10),
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
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])

    check = commands.add_parser(
        "check", help="validate rule files; print one file:line:column: error per problem"
    )
    check.add_argument("paths", nargs="+", metavar="PATH", help="rule file or directory")
    check.add_argument("--format", choices=["text", "json"], default="text",
                       help="text: one problem per line; json: {problems, rules} (default text)")

    commands.add_parser("schema", help="print the JSON Schema of a rule file (for editors)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from outcomewatch.server import Address, Server, Settings

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    )
    try:
        server = Server(settings)
        asyncio.run(server.run_until_signalled())
    except RuleError as exc:
        print(exc, file=sys.stderr)
        print(f"outcomewatch: {len(exc.problems)} error(s) in rule or config files",
              file=sys.stderr)
        return 2
    except (StoreError, OSError) as exc:
        print(f"outcomewatch: {exc}", file=sys.stderr)
        return 1
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "schema":
        return _schema()
    return _check(args)


if __name__ == "__main__":
    sys.exit(main())
