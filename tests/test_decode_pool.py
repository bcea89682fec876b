"""Decode workers (receiver/decode_pool.py): the batch a worker sends back is the batch the
server's process would have made, a dead worker costs no export, and a server decoding in a
worker stores spans and decides runs as one decoding in-process does (real exporters)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import Status, StatusCode

from outcomewatch.errors import InvalidPayload
from outcomewatch.otlp import SpanBatch
from outcomewatch.otlp_limits import SpanLimits
from outcomewatch.receiver.decode_pool import (
    DecodePool,
    auto_workers,
    decode_here,
    usable_cpus,
)
from tests.harness import RunningServer, running_server, trace_id_of
from tests.processes import serving, wait_for
from tests.spans import TRACE_ID, raw_request

LIMITS = SpanLimits(max_attributes_per_span=3)
T = TypeVar("T")


def mixed_request() -> ExportTraceServiceRequest:
    """Three spans of two resources: one over the attribute limit (rejected), one with a
    link, one with attributes, an event and an error status."""
    request = raw_request(b"\x01" * 8, b"\x02" * 8, service="billing")
    spans = request.resource_spans[0].scope_spans[0].spans
    for k in range(4):
        spans[0].attributes.add(key=f"a{k}").value.string_value = "x"  # over the limit
    link = spans[1].links.add(trace_id=b"\x07" * 16, span_id=b"\x08" * 8)
    link.attributes.add(key="why").value.string_value = "retry"
    other = request.resource_spans.add()
    other.resource.attributes.add(key="service.name").value.string_value = "email"
    span = other.scope_spans.add().spans.add(name="email.sent", trace_id=TRACE_ID,
                                             span_id=b"\x03" * 8)
    span.start_time_unix_nano, span.end_time_unix_nano = 5, 6
    span.status.code, span.status.message = span.status.STATUS_CODE_ERROR, "provider said 550"
    span.attributes.add(key="http.response.status_code").value.int_value = 550
    span.events.add(name="retry", time_unix_nano=5)
    return request


@dataclass
class Pooled:
    """A pool of one worker and the event loop its pipes belong to."""

    decoder: DecodePool
    runner: asyncio.Runner

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coroutine)

    def decode(self, body: bytes, received_ns: int) -> SpanBatch:
        return self.run(self.decoder.decode(body, received_ns))


@pytest.fixture
def pool() -> Iterator[Pooled]:
    with asyncio.Runner() as runner:
        pooled = Pooled(DecodePool(1, LIMITS), runner)
        pooled.run(pooled.decoder.start())
        yield pooled
        pooled.run(pooled.decoder.close())


def same(a: SpanBatch, b: SpanBatch) -> None:
    assert len(a) == len(b)
    assert (a.received_ns, a.rejected, a.problems) == (b.received_ns, b.rejected, b.problems)
    assert a.table().equals(b.table())
    assert a.resources() == b.resources()
    assert a.trace_ids() == b.trace_ids() and a.names() == b.names()
    assert a.spans_named(a.names()) == b.spans_named(b.names())
    assert [a.trace_id_of(i) for i in range(len(a))] == [b.trace_id_of(i) for i in range(len(b))]
    assert a.linked() == b.linked()
    assert [a.decode(i) for i in range(len(a))] == [b.decode(i) for i in range(len(b))]
    assert a.decode_many(list(range(len(a)))[::-1]) == [b.decode(i) for i in range(len(b))][::-1]
    assert [a.link_targets(i) for i in a.linked()] == [b.link_targets(i) for i in b.linked()]


def test_a_worker_sends_back_the_batch_the_server_would_have_made(pool):
    body = mixed_request().SerializeToString()
    here = decode_here(body, 42, LIMITS)
    assert here.rejected == 1 and len(here) == 2 and here.linked() == {0}
    there = pool.decode(body, 42)
    assert there._table is not None and not there.raw  # the table form, not re-decoded lists
    same(here, there)
    assert there.decode(1).attributes == {"http.response.status_code": 550}
    assert there.decode(1).resource == {"service.name": "email"}
    assert there.link_targets(0) == [(b"\x07" * 16).hex()]


def test_both_forms_give_distinct_ids_and_names_first_seen_and_named_spans_in_order():
    """What the engine and the trace index read per batch, the same from the lists and from a
    worker's table: spans interleaved across traces and names, repeats included."""
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    for k, (trace, name) in enumerate([(2, "b"), (1, "a"), (2, "a"), (3, "c"), (1, "b")]):
        spans.add(trace_id=bytes([trace]) * 16, span_id=bytes([k + 1]) * 8, name=name)
    body = request.SerializeToString()
    here = decode_here(body, 42, LIMITS)
    there = SpanBatch.from_wire(decode_here(body, 42, LIMITS).to_wire())
    for batch in (here, there):
        assert batch.trace_ids() == [(bytes([t]) * 16).hex() for t in (2, 1, 3)]
        assert batch.names() == ["b", "a", "c"]
        assert batch.spans_named({"b", "c"}) == [(0, "b"), (3, "c"), (4, "b")]
        assert batch.spans_named(set()) == []
        assert batch.trace_id_of(3) == (b"\x03" * 16).hex()


def test_a_stamp_sets_received_ns_in_both_forms_alike():
    """The pipeline re-stamps every batch at commit (pipeline.py): the table a worker built
    must carry the new time, as the one built here later does."""
    body = mixed_request().SerializeToString()
    here = decode_here(body, 42, LIMITS)  # its table not built yet
    there = SpanBatch.from_wire(decode_here(body, 42, LIMITS).to_wire())
    assert here._table is None
    assert there.table().column("received_ns").to_pylist() == [42, 42]
    for batch in (here, there):
        batch.stamp(1_000)
    same(here, there)
    assert there.table().column("received_ns").to_pylist() == [1_000, 1_000]
    assert there.table().schema == here.table().schema


def test_an_invalid_request_is_refused_with_the_same_error(pool):
    body = b"\x0a\x05\xff\xff"  # resource_spans: a truncated message
    with pytest.raises(InvalidPayload) as here:
        decode_here(body, 1, LIMITS)
    with pytest.raises(InvalidPayload) as there:
        pool.decode(body, 1)
    assert str(there.value) == str(here.value)


def test_a_dead_worker_costs_no_export(pool):
    body = mixed_request().SerializeToString()
    (pid,) = pool.decoder.pids()
    os.kill(pid, signal.SIGKILL)
    first = pool.decode(body, 7)  # sent to the dead worker, decoded here
    same(first, decode_here(body, 7, LIMITS))
    assert pool.decoder.replaced == 1
    (new,) = pool.decoder.pids()
    assert new != pid
    pool.run(wait_until_ready(pool.decoder))
    second = pool.decode(body, 8)  # by the new worker
    assert second._table is not None and not second.raw
    same(second, decode_here(body, 8, LIMITS))
    assert pool.decoder.replaced == 1


async def wait_until_ready(decoder: DecodePool) -> None:
    assert all([await worker.wait_ready() for worker in decoder._pool])


def test_a_worker_that_dies_idle_is_replaced(pool):
    (pid,) = pool.decoder.pids()

    async def kill_and_wait_for_the_new_one() -> None:
        gone = pool.decoder._pool[0]
        os.kill(pid, signal.SIGKILL)
        await gone.reap()  # its replies ended: the replacement has been started
        assert pool.decoder._background
        await asyncio.gather(*pool.decoder._background)
        await wait_until_ready(pool.decoder)

    pool.run(kill_and_wait_for_the_new_one())
    assert pool.decoder.replaced == 1 and pool.decoder.pids() != [pid]
    body = mixed_request().SerializeToString()
    batch = pool.decode(body, 3)
    assert batch._table is not None
    same(batch, decode_here(body, 3, LIMITS))


def test_a_worker_that_cannot_start_fails_the_start_and_is_not_respawned(capfd):
    decoder = DecodePool(1, "not SpanLimits")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="exited while starting"):
        asyncio.run(decoder.start())
    assert decoder.pids() == [] and decoder.replaced == 0
    assert "AssertionError" in capfd.readouterr().err  # the worker's own error, on stderr


def test_exports_in_flight_are_answered_in_order_and_before_close(pool):
    """Several exports pipelined to one worker each get their own batch, and close() waits
    for the worker to answer them rather than dropping them."""
    bodies = [raw_request(bytes([k + 1]) * 8, bytes([k + 2]) * 8, service=f"s{k}")
              .SerializeToString() for k in range(20)]

    async def decode_all_then_close() -> list[SpanBatch]:
        decoding = [asyncio.create_task(pool.decoder.decode(b, k)) for k, b in enumerate(bodies)]
        await asyncio.sleep(0)  # all sent to the worker
        assert pool.decoder._pool[0].load == len(bodies)
        await pool.decoder.close()
        return list(await asyncio.gather(*decoding))

    batches = pool.run(decode_all_then_close())
    for k, (body, batch) in enumerate(zip(bodies, batches, strict=True)):
        assert batch._table is not None  # decoded by the worker, not here
        same(batch, decode_here(body, k, LIMITS))
    assert pool.decoder.replaced == 0 and pool.decoder.pids() == []


def test_a_worker_ignores_ctrl_c_and_sigterm_the_server_stops_it(pool):
    body = mixed_request().SerializeToString()
    (pid,) = pool.decoder.pids()
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    same(pool.decode(body, 9), decode_here(body, 9, LIMITS))
    assert pool.decoder.pids() == [pid] and pool.decoder.replaced == 0
    pool.run(pool.decoder.close())
    assert pool.decoder.pids() == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (reaped by close)


def test_no_workers_decodes_in_the_calling_process():
    decoder = DecodePool(0, LIMITS)
    asyncio.run(decoder.start())
    body = mixed_request().SerializeToString()
    batch = asyncio.run(decoder.decode(body, 3))
    assert batch._table is None and len(batch.raw) == 2
    assert decoder.pids() == []
    with pytest.raises(ValueError, match="0 or more"):
        DecodePool(-1, LIMITS)


@pytest.mark.parametrize(("cpus", "workers"), [(1, 0), (2, 1), (3, 2), (64, 4)])
def test_auto_leaves_one_cpu_to_the_server(cpus, workers):
    assert auto_workers(cpus) == workers


@pytest.mark.parametrize(("files", "cpus"), [
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs of quota: 2
    ({"cpu.max": "100000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),  # no quota: the affinity
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_a_containers_cpu_quota_bounds_the_usable_cpus(tmp_path, files, cpus):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == (affinity if cpus is None else min(cpus, affinity))


@pytest.fixture
def pooled(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path, decode_workers=1) as running:
        assert running.server.decoder is not None and len(running.server.decoder.pids()) == 1
        yield running


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_server_decoding_in_a_worker_decides_runs_and_keeps_the_evidence(pooled, transport):
    tracer = pooled.tracer(transport, **{"service.name": "billing"})
    with tracer.start_as_current_span(
            "stripe.webhook", attributes={"event.type": "invoice.payment_failed"}) as root, \
            tracer.start_as_current_span(
                "entitlement.updated", attributes={"http.response.status_code": 502}) as child:
        child.set_status(Status(StatusCode.ERROR, "upstream 502"))
    failed = trace_id_of(root)
    with tracer.start_as_current_span(
            "stripe.webhook", attributes={"event.type": "invoice.payment_failed"}) as root:
        with tracer.start_as_current_span("entitlement.updated") as child:
            child.set_status(Status(StatusCode.OK))
        tracer.start_span("email.delivered", attributes={"email.template": "dunning"}).end()
    passed = trace_id_of(root)
    pooled.go_idle()
    pooled.advance(timedelta(minutes=10, seconds=1))
    rule = "payment-failed-updates-access"
    assert pooled.verdict(failed, rule)["status"] == "failed"
    assert pooled.verdict(passed, rule)["status"] == "passed"
    spans = pooled.get(f"/api/v1/traces/{failed}")["spans"]
    (error,) = [s for s in spans if s["name"] == "entitlement.updated"]
    assert error["attributes"]["http.response.status_code"] == 502
    assert error["status_message"] == "upstream 502"


def children_of(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if ":\t" in line)
        except OSError:  # gone while listing
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_workers_of_a_killed_server_leave_with_it(tmp_path):
    with serving(tmp_path, args=["--decode-workers", "1"]) as server:
        workers = [pid for pid in children_of(server.pid) if "outcomewatch.receiver.decode_worker"
                   in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 1
        server.kill9()
        wait_for(lambda: not any(alive(pid) for pid in workers) or None,
                 "the decode worker to leave after its server was killed")
