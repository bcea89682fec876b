"""``outcomewatch demo``: the real server, the example rules on a short clock, and the five seed
stories played through the official OpenTelemetry SDK exporter, so that within a minute the
console shows incidents, runs at risk and passing runs.

The server is handed in (cli.py builds it: only the CLI imports the server). The rules are a copy
of the examples with every ``within`` scaled down (``scale_within``) and the trace idle time is
2 s; the stories repeat every ``every`` seconds with new ids, healthy and broken, until stopped.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, TextIO

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode, Tracer

from outcomewatch.durations import format_duration, parse_duration

TRACE_IDLE = timedelta(seconds=2)
SHORTEST = timedelta(seconds=3)
LONGEST = timedelta(seconds=20)
_WITHIN = re.compile(r"^(?P<head>\s*within:\s*)(?P<value>[0-9a-z]+)", re.MULTILINE)


def scale_within(within: timedelta) -> timedelta:
    """A rule's ``within`` on the demo's clock: a minute becomes a second, kept between 3 s and
    20 s, so every deadline falls inside the demo's first minute."""
    return min(max(within / 60, SHORTEST), LONGEST)


def prepare_rules(source: Path, target: Path) -> Path:
    """Copy the rule files of ``source`` (not the ``*.test.yaml`` cases) to ``target``, emptied
    first, with every ``within`` scaled; comments stay. Returns ``target``."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.y*ml")):
        if path.name.endswith((".test.yaml", ".test.yml")):
            continue
        text = _WITHIN.sub(
            lambda m: m["head"] + format_duration(scale_within(parse_duration(m["value"]))),
            path.read_text(encoding="utf-8"))
        (target / path.name).write_text(text, encoding="utf-8")
    return target


def fresh_db(path: Path) -> Path:
    """``path`` with no database in it: a demo file (and its WAL) from a previous demo goes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".wal")):
        stale.unlink(missing_ok=True)
    return path


# -- the five seed stories (shared/seeds), as the SDK sends them -----------------------------

DEPLOY = {"service.version": "2026.11.3-9f1c2ab", "host.name": "worker-7"}


def _ok(tracer: Tracer, name: str, **attributes: Any) -> None:
    with tracer.start_as_current_span(name, attributes=attributes) as span:
        span.set_status(Status(StatusCode.OK))


def _error(tracer: Tracer, name: str, message: str, **attributes: Any) -> None:
    with tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        span.record_exception(RuntimeError(message))
        span.set_status(Status(StatusCode.ERROR, message))


def payment_failed(tracer: Tracer, n: int, *, outcome: str) -> None:
    """01. outcome: ``ok``; ``no_job`` (the webhook answered 200, nothing else happened: waits
    for the deadline); ``rejected`` (the mail provider refused the dunning email: fails now)."""
    with tracer.start_as_current_span("stripe.webhook", attributes={
        "event.type": "invoice.payment_failed", "subscription.id": f"sub_demo{n:03d}",
        "customer.id": f"cus_demo{n:03d}", "invoice.id": f"in_demo{n:03d}",
        "http.response.status_code": 200,
    }):
        _ok(tracer, "subscription.local_state.update")
        if outcome == "ok":
            _ok(tracer, "entitlement.updated", plan="past_due")
            _ok(tracer, "email.delivered", **{"email.template": "dunning"})
        elif outcome == "rejected":
            _ok(tracer, "entitlement.updated", plan="past_due")
            _error(tracer, "email.send", "413 Payload Too Large: attachment exceeds 10 MB", **{
                "email.template": "dunning", "http.response.status_code": 413,
                "provider": "postmark", "provider.response": '{"ErrorCode": 300}'})


def scheduled_report(tracer: Tracer, n: int, *, delivered: bool) -> None:
    """02. The report renders; its email is delivered, or the provider refuses it."""
    with tracer.start_as_current_span("report.generate", attributes={
        "report.schedule": "daily-08:00", "report.id": f"rep_demo{n:03d}",
        "customer.id": f"cus_rep{n:03d}",
    }):
        _ok(tracer, "report.query", rows=1200)
        _ok(tracer, "report.render")
        if delivered:
            _ok(tracer, "email.delivered", provider="postmark")
        else:
            _error(tracer, "email.send", "550 5.1.1 mailbox unavailable", provider="postmark",
                   **{"smtp.reply_code": 550})


def model_batch(tracer: Tracer, n: int, *, persisted: bool) -> None:
    """03. The model call succeeds; the results are validated and published, or not."""
    with tracer.start_as_current_span("batch.process", attributes={
        "batch.size": 32, "batch.id": f"b-demo-{n:03d}"}):
        _ok(tracer, "model.call", model="classifier-v4")
        if persisted:
            _ok(tracer, "result.validated")
            _ok(tracer, "result.persisted")
            _ok(tracer, "result.published")
        else:
            _error(tracer, "result.validated", "schema mismatch: field 'score' is null")


def crm_task(tracer: Tracer, n: int, *, accepted: bool) -> None:
    """04. The queue drains; the CRM accepts the update, or answers 422."""
    with tracer.start_as_current_span("queue.consume", attributes={
        "task.type": "crm.contact_update", "task.id": f"task-demo{n:03d}",
        "external.id": f"hs-contact-{5500 + n}"}):
        if accepted:
            _ok(tracer, "external.update", **{"http.response.status_code": 200})
            _ok(tracer, "state.reconciled")
        else:
            with tracer.start_as_current_span("external.update", attributes={
                "http.response.status_code": 422,
                "http.response.body": "property 'lifecyclestage' invalid"}) as update:
                update.set_status(Status(StatusCode.ERROR,
                                         "422: property 'lifecyclestage' invalid"))


def backup_drill(tracer: Tracer, n: int, *, outcome: str) -> None:
    """05. outcome: ``ok``; ``no_restore`` (uploaded, never restored: waits for the deadline);
    ``restore_failed`` (a restore attempt failed: at risk, a retry may still succeed);
    ``undecryptable`` (the decrypt check failed: fails now)."""
    with tracer.start_as_current_span("backup.run", attributes={"backup.id": f"bk-demo{n:03d}"}):
        _ok(tracer, "backup.dump")
        _ok(tracer, "backup.upload", bucket="backups-eu")
        if outcome == "ok":
            _ok(tracer, "backup.decrypt_check")
            _ok(tracer, "restore.verify", tables=214)
        elif outcome == "restore_failed":
            _ok(tracer, "backup.decrypt_check")
            _error(tracer, "restore.verify", "relation \"invoices\" missing after restore")
        elif outcome == "undecryptable":
            _error(tracer, "backup.decrypt_check", "gpg: decryption failed: No secret key")


@dataclass(frozen=True)
class Story:
    service: str
    play: Callable[[Tracer, int], None]


def stories() -> list[Story]:
    """One round: each seed story healthy and broken (broken in the ways that fail at once, that
    wait for the deadline, and that put a run at risk)."""
    return [
        Story("billing", lambda t, n: payment_failed(t, n, outcome="ok")),
        Story("billing", lambda t, n: payment_failed(t, n + 500, outcome="no_job")),
        Story("billing", lambda t, n: payment_failed(t, n + 700, outcome="rejected")),
        Story("reports", lambda t, n: scheduled_report(t, n, delivered=True)),
        Story("reports", lambda t, n: scheduled_report(t, n + 500, delivered=False)),
        Story("inference", lambda t, n: model_batch(t, n, persisted=True)),
        Story("inference", lambda t, n: model_batch(t, n + 500, persisted=False)),
        Story("crm-sync", lambda t, n: crm_task(t, n, accepted=True)),
        Story("crm-sync", lambda t, n: crm_task(t, n + 500, accepted=False)),
        Story("backup", lambda t, n: backup_drill(t, n, outcome="ok")),
        Story("backup", lambda t, n: backup_drill(t, n + 500, outcome="no_restore")),
        Story("backup", lambda t, n: backup_drill(t, n + 700, outcome="restore_failed")),
        Story("backup", lambda t, n: backup_drill(t, n + 900, outcome="undecryptable")),
    ]


@contextmanager
def tracers(grpc_endpoint: str) -> Iterator[Callable[[str], Tracer]]:
    """``tracer(service)``: a tracer per service whose spans the official OTLP/gRPC exporter
    sends to ``grpc_endpoint`` as each span ends. Providers are shut down (flushed) on exit."""
    providers: dict[str, TracerProvider] = {}

    def tracer(service: str) -> Tracer:
        if service not in providers:
            provider = TracerProvider(resource=Resource.create({"service.name": service,
                                                                **DEPLOY}))
            provider.add_span_processor(SimpleSpanProcessor(
                OTLPSpanExporter(endpoint=grpc_endpoint, insecure=True)))
            providers[service] = provider
        return providers[service].get_tracer("outcomewatch-demo")

    try:
        yield tracer
    finally:
        for provider in providers.values():
            provider.shutdown()


def play_round(grpc_endpoint: str, n: int) -> int:
    """Play every story once with ids numbered ``n``; returns how many traces were sent."""
    played = stories()
    with tracers(grpc_endpoint) as tracer:
        for story in played:
            story.play(tracer(story.service), n)
    return len(played)


# -- running it ------------------------------------------------------------------------------


class DemoServer(Protocol):
    """What the demo needs of outcomewatch.server.Server."""

    grpc_port: int
    api_port: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run(server: DemoServer, *, api_host: str, grpc_host: str, out: TextIO,
              every: timedelta, rounds: int | None = None) -> None:
    """Start ``server``, print where to look, play a round of stories now and every ``every``
    (at most ``rounds`` rounds), serve until SIGINT or SIGTERM, then stop the server."""
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    grpc_endpoint = f"{_host(grpc_host)}:{server.grpc_port}"
    print(f"outcomewatch demo: open http://{_host(api_host)}:{server.api_port}/", file=out,
          flush=True)
    print(f"  OTLP/gRPC {grpc_endpoint}; new stories every {format_duration(every)}; "
          "Ctrl-C stops", file=out, flush=True)
    try:
        played = 0
        while not stop.is_set():
            if rounds is None or played < rounds:
                played += 1
                sent = await asyncio.to_thread(play_round, grpc_endpoint, played)
                print(f"  round {played}: {sent} traces sent", file=out, flush=True)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every.total_seconds())
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()


def _host(host: str) -> str:
    """A listen host as a client dials it: the wildcard is dialled on loopback."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
