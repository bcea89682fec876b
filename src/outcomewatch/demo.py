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
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, TextIO

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode, Tracer, set_span_in_context

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


class Play:
    """One story's trace, as services would send it: a root span and its steps, each step from
    its own service's tracer (the trace context passed on, as across a queue or an HTTP call),
    placed at offsets in milliseconds from a start ``total_ms`` before now (deadlines count
    from the trigger's start, so the story lies in the recent past, never in the future)."""

    def __init__(self, tracer: Callable[[str], Tracer], total_ms: float) -> None:
        self._tracer = tracer
        self._t0 = time.time_ns() - int(total_ms * 1e6)
        self._context: Context | None = None

    def _at(self, ms: float) -> int:
        return self._t0 + int(ms * 1e6)

    @contextmanager
    def root(self, service: str, name: str, duration_ms: float,
             **attributes: Any) -> Iterator[None]:
        span = self._tracer(service).start_span(name, attributes=attributes,
                                                start_time=self._at(0))
        self._context = set_span_in_context(span)
        try:
            yield
        finally:
            span.set_status(Status(StatusCode.OK))
            span.end(end_time=self._at(duration_ms))  # children end (and are sent) first

    def ok(self, service: str, name: str, start_ms: float, duration_ms: float,
           **attributes: Any) -> None:
        span = self._tracer(service).start_span(
            name, context=self._context, attributes=attributes, start_time=self._at(start_ms))
        span.set_status(Status(StatusCode.OK))
        span.end(end_time=self._at(start_ms + duration_ms))

    def error(self, service: str, name: str, message: str, start_ms: float, duration_ms: float,
              **attributes: Any) -> None:
        span = self._tracer(service).start_span(
            name, context=self._context, attributes=attributes, start_time=self._at(start_ms))
        span.record_exception(RuntimeError(message), timestamp=self._at(start_ms + duration_ms))
        span.set_status(Status(StatusCode.ERROR, message))
        span.end(end_time=self._at(start_ms + duration_ms))


Tracers = Callable[[str], Tracer]


def payment_failed(tracer: Tracers, n: int, *, outcome: str) -> None:
    """01. outcome: ``ok``; ``no_job`` (the webhook answered 200, nothing else happened: waits
    for the deadline); ``rejected`` (the mail provider refused the dunning email: fails now)."""
    play = Play(tracer, 1800)
    with play.root("billing", "stripe.webhook", 180, **{
        "event.type": "invoice.payment_failed", "subscription.id": f"sub_demo{n:03d}",
        "customer.id": f"cus_demo{n:03d}", "invoice.id": f"in_demo{n:03d}",
        "http.response.status_code": 200,
    }):
        play.ok("billing", "subscription.local_state.update", 12, 35)
        if outcome == "ok":
            play.ok("entitlements", "entitlement.updated", 420, 160, plan="past_due")
            play.ok("mailer", "email.delivered", 900, 640, **{"email.template": "dunning"})
        elif outcome == "rejected":
            play.ok("entitlements", "entitlement.updated", 420, 160, plan="past_due")
            play.error("mailer", "email.send", "413 Payload Too Large: attachment exceeds 10 MB",
                       900, 310, **{"email.template": "dunning",
                                    "http.response.status_code": 413, "provider": "postmark",
                                    "provider.response": '{"ErrorCode": 300}'})


def scheduled_report(tracer: Tracers, n: int, *, delivered: bool) -> None:
    """02. The report renders; its email is delivered, or the provider refuses it."""
    play = Play(tracer, 1600)
    with play.root("reports", "report.generate", 1500, **{
        "report.schedule": "daily-08:00", "report.id": f"rep_demo{n:03d}",
        "customer.id": f"cus_rep{n:03d}",
    }):
        play.ok("reports", "report.query", 20, 640, rows=1200)
        play.ok("reports", "report.render", 680, 520)
        if delivered:
            play.ok("mailer", "email.delivered", 1220, 250, provider="postmark")
        else:
            play.error("mailer", "email.send", "550 5.1.1 mailbox unavailable", 1220, 180,
                       provider="postmark", **{"smtp.reply_code": 550})


def model_batch(tracer: Tracers, n: int, *, persisted: bool) -> None:
    """03. The model call succeeds; the results are validated and published, or not."""
    play = Play(tracer, 1500)
    with play.root("inference", "batch.process", 1400, **{
            "batch.size": 32, "batch.id": f"b-demo-{n:03d}"}):
        play.ok("inference", "model.call", 10, 820, model="classifier-v4")
        if persisted:
            play.ok("inference", "result.validated", 850, 90)
            play.ok("results-store", "result.persisted", 960, 210)
            play.ok("product-api", "result.published", 1190, 150)
        else:
            play.error("inference", "result.validated",
                       "schema mismatch: field 'score' is null", 850, 90)


def crm_task(tracer: Tracers, n: int, *, accepted: bool) -> None:
    """04. The queue drains; the CRM accepts the update, or answers 422."""
    play = Play(tracer, 1200)
    with play.root("crm-sync", "queue.consume", 1100, **{
        "task.type": "crm.contact_update", "task.id": f"task-demo{n:03d}",
        "external.id": f"hs-contact-{5500 + n}"}):
        if accepted:
            play.ok("crm-sync", "external.update", 40, 610,
                    **{"http.response.status_code": 200})
            play.ok("crm-sync", "state.reconciled", 700, 120)
        else:
            play.error("crm-sync", "external.update", "422: property 'lifecyclestage' invalid",
                       40, 380, **{"http.response.status_code": 422,
                                   "http.response.body": "property 'lifecyclestage' invalid"})


def backup_drill(tracer: Tracers, n: int, *, outcome: str) -> None:
    """05. outcome: ``ok``; ``no_restore`` (uploaded, never restored: waits for the deadline);
    ``restore_failed`` (a restore attempt failed: at risk, a retry may still succeed);
    ``undecryptable`` (the decrypt check failed: fails now)."""
    play = Play(tracer, 2000)
    with play.root("backup", "backup.run", 1900, **{"backup.id": f"bk-demo{n:03d}"}):
        play.ok("backup", "backup.dump", 10, 700)
        play.ok("backup", "backup.upload", 720, 480, bucket="backups-eu")
        if outcome == "ok":
            play.ok("restore-drill", "backup.decrypt_check", 1210, 150)
            play.ok("restore-drill", "restore.verify", 1370, 500, tables=214)
        elif outcome == "restore_failed":
            play.ok("restore-drill", "backup.decrypt_check", 1210, 150)
            play.error("restore-drill", "restore.verify",
                       'relation "invoices" missing after restore', 1370, 420)
        elif outcome == "undecryptable":
            play.error("restore-drill", "backup.decrypt_check",
                       "gpg: decryption failed: No secret key", 1210, 60)


Story = Callable[[Tracers, int], None]


def stories() -> list[Story]:
    """One round: each seed story healthy and broken (broken in the ways that fail at once, that
    wait for the deadline, and that put a run at risk)."""
    return [
        lambda t, n: payment_failed(t, n, outcome="ok"),
        lambda t, n: payment_failed(t, n + 500, outcome="no_job"),
        lambda t, n: payment_failed(t, n + 700, outcome="rejected"),
        lambda t, n: scheduled_report(t, n, delivered=True),
        lambda t, n: scheduled_report(t, n + 500, delivered=False),
        lambda t, n: model_batch(t, n, persisted=True),
        lambda t, n: model_batch(t, n + 500, persisted=False),
        lambda t, n: crm_task(t, n, accepted=True),
        lambda t, n: crm_task(t, n + 500, accepted=False),
        lambda t, n: backup_drill(t, n, outcome="ok"),
        lambda t, n: backup_drill(t, n + 500, outcome="no_restore"),
        lambda t, n: backup_drill(t, n + 700, outcome="restore_failed"),
        lambda t, n: backup_drill(t, n + 900, outcome="undecryptable"),
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
            # A short timeout bounds the SDK's retries when the server refuses (UNAVAILABLE).
            provider.add_span_processor(SimpleSpanProcessor(
                OTLPSpanExporter(endpoint=grpc_endpoint, insecure=True, timeout=5)))
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
            story(tracer, n)
    return len(played)


# -- running it ------------------------------------------------------------------------------


class DemoServer(Protocol):
    """What the demo needs of outcomewatch.server.Server."""

    grpc_port: int
    api_port: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run(server: DemoServer, *, api_host: str, grpc_host: str, out: TextIO,
              every: timedelta, rounds: int | None = None,
              play: Callable[[str, int], int] = play_round,
              stop: asyncio.Event | None = None) -> None:
    """Start ``server``, print where to look, play a round of stories now and every ``every``
    (at most ``rounds`` rounds), serve until SIGINT or SIGTERM (or until ``stop`` is set),
    then stop the server. A round still being sent when it is told to stop is abandoned."""
    await server.start()
    stop = stop or asyncio.Event()
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
                sent = await _unless_stopped(stop, play, grpc_endpoint, played)
                if sent is None:
                    break
                print(f"  round {played}: {sent} traces sent", file=out, flush=True)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every.total_seconds())
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()


async def _unless_stopped(stop: asyncio.Event, play: Callable[[str, int], int], endpoint: str,
                          n: int) -> int | None:
    """``play(endpoint, n)`` in a daemon thread; None if ``stop`` is set first. Ctrl-C must not
    wait for a round whose exports the SDK is retrying (say, against a failing store): the
    thread is left to its exporter's timeout, and a daemon thread never holds up the exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def settle(result: int | None, error: Exception | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result or 0)

    def target() -> None:
        try:
            result, error = play(endpoint, n), None
        except Exception as exc:  # handed to the loop, raised there
            result, error = None, exc
        with suppress(RuntimeError):  # the loop closed already: the demo stopped meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name=f"demo-round-{n}", daemon=True).start()
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    waiting: set[asyncio.Future[Any]] = {done, stopped}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    return done.result() if done.done() else None


def _host(host: str) -> str:
    """A listen host as a client dials it: the wildcard is dialled on loopback."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
