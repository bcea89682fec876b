"""The OTLP format boundary: request bytes (protobuf) -> SpanBatch -> Span.

Decoding is split on purpose. ``batch_from_request`` reads only the scalar fields of every span
(ids, name, times, status, kind) and keeps each span's serialised bytes for storage; attributes
are decoded per span, on demand (``SpanBatch.decode``), only for the few spans a rule or a read
needs. Decoding every attribute of every span in Python would cap ingest near 50k spans/s
(see shared/design/PERFORMANCE.md). The SpanLimits checks keep to that rule: see
``batch_from_request``; the exact, slow checks are in otlp_limits.py, the message types that
read a request at C speed in otlp_probe.py, protobuf to model values in otlp_decode.py.

Values are named by representation: ``pb_span`` is a protobuf message, ``span`` a model.Span.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, fields

import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from outcomewatch.errors import InvalidPayload
from outcomewatch.model import AttributeValue, Span
from outcomewatch.otlp_decode import (
    attributes,
    decode_span,
    resource_attributes,
    resource_id,
)
from outcomewatch.otlp_limits import (
    DEFAULT_LIMITS,
    MAX_TIME_NS,
    SPAN_KIND_MAX,
    STATUS_CODE_MAX,
    ZERO_SPAN,
    ZERO_TRACE,
    SpanLimits,
    resource_problem,
    span_problem,
)
from outcomewatch.otlp_probe import probe, raw_spans

# A span as the store keeps it: the columns of the spans table (store/schema.py), in order.
SPAN_COLUMNS = pa.schema([
    ("trace_id", pa.string()), ("span_id", pa.string()), ("parent_span_id", pa.string()),
    ("name", pa.string()), ("service", pa.string()), ("scope", pa.string()),
    ("kind", pa.int8()), ("start_ns", pa.int64()), ("end_ns", pa.int64()),
    ("status_code", pa.int8()), ("status_message", pa.string()), ("received_ns", pa.int64()),
    ("span", pa.binary()), ("resource_id", pa.int64()),
])


@dataclass
class SpanBatch:
    """The accepted spans of one export request, column by column.

    Columns hold only what is cheap to read for every span. ``raw`` is each span's own protobuf
    bytes (attributes, events, links inside) and ``raw_resource`` its resource's; both are what
    the store keeps. ``decode(i)`` builds the full model.Span of span ``i`` on demand.

    A batch has one of two forms. As ``batch_from_request`` makes it, every list is filled. As
    a decode worker sends it (``to_wire`` / ``from_wire``, see receiver/decode_pool.py), the
    lists are empty and the spans are in ``table()``, the rows of the store, already built.
    What the engine and the trace index read of every span goes through ``trace_ids``,
    ``names`` and ``spans_named``, which read either form; on the table they run in Arrow's C
    kernels, so the event loop touches only the distinct ids and names and the spans a rule
    looks at, not all of them (a Python list of every id and name was ~15% of the loop's
    time under quiet load).
    """

    received_ns: int
    trace_id: list[str] = field(default_factory=list)
    span_id: list[str] = field(default_factory=list)
    parent_span_id: list[str] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    service: list[str] = field(default_factory=list)
    scope: list[str] = field(default_factory=list)
    kind: list[int] = field(default_factory=list)
    start_ns: list[int] = field(default_factory=list)
    end_ns: list[int] = field(default_factory=list)
    status_code: list[int] = field(default_factory=list)
    status_message: list[str] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    raw_resource: list[bytes] = field(default_factory=list)
    rejected: int = 0
    problems: list[str] = field(default_factory=list)
    _pb_spans: list[PbSpan] = field(default_factory=list, repr=False)
    _resource_of: list[int] = field(default_factory=list, repr=False)
    _resources: list[dict[str, AttributeValue]] = field(default_factory=list, repr=False)
    _table: pa.Table | None = field(default=None, repr=False)
    _raw_resources: dict[int, bytes] = field(default_factory=dict, repr=False)  # by id
    _linked: frozenset[int] | None = field(default=None, repr=False)
    _decoded_resources: dict[int, dict[str, AttributeValue]] = field(
        default_factory=dict, repr=False)
    _from_wire: bool = field(default=False, repr=False)  # the lists are empty: read the table
    _distinct: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.table().num_rows if self._from_wire else len(self.trace_id)

    def trace_ids(self) -> list[str]:
        """The batch's distinct trace ids, in the order first seen."""
        return self._distinct_of("trace_id")

    def names(self) -> list[str]:
        """The batch's distinct span names, in the order first seen."""
        return self._distinct_of("name")

    def spans_named(self, names: Collection[str]) -> list[tuple[int, str]]:
        """(position, name) of every span whose name is one of ``names``, in batch order."""
        if not names:
            return []
        if not self._from_wire:
            return [(i, name) for i, name in enumerate(self.name) if name in names]
        column = self.table().column("name")
        positions = pc.indices_nonzero(
            pc.is_in(column, value_set=pa.array(list(names), pa.string())))
        return list(zip(positions.to_pylist(), pc.take(column, positions).to_pylist(),
                        strict=True))

    def trace_id_of(self, i: int) -> str:
        if self._from_wire:
            return str(self.table().column("trace_id")[i].as_py())
        return self.trace_id[i]

    def _distinct_of(self, column: str) -> list[str]:
        # Cached: the engine (event loop) and the trace index (writer thread) both ask; were
        # both to compute it at once, each would store an equal list.
        values = self._distinct.get(column)
        if values is None:
            values = self._distinct[column] = (
                pc.unique(self.table().column(column)).to_pylist() if self._from_wire
                else list(dict.fromkeys(getattr(self, column))))
        return values

    def stamp(self, received_ns: int) -> None:
        """Set when the spans were received (what the store keeps, in both forms)."""
        self.received_ns = received_ns
        if self._table is not None:
            column = self._table.schema.get_field_index("received_ns")
            self._table = self._table.set_column(
                column, SPAN_COLUMNS.field(column),
                pa.repeat(pa.scalar(received_ns, pa.int64()), len(self)))

    def decode(self, i: int) -> Span:
        if self._table is None:
            return decode_span(self._pb_spans[i], self._resources[self._resource_of[i]],
                               scope=self.scope[i])
        table = self._table
        return decode_span(PbSpan.FromString(table.column("span")[i].as_py()),
                           self._resource(table.column("resource_id")[i].as_py()),
                           scope=table.column("scope")[i].as_py())

    def decode_many(self, positions: list[int]) -> list[Span]:
        """``decode(i)`` for each of ``positions``: from the table, its columns are read once
        for all of them rather than a scalar at a time."""
        if self._table is None or not positions:
            return [self.decode(i) for i in positions]
        picked = self._table.select(["span", "resource_id", "scope"]).take(positions)
        return [decode_span(PbSpan.FromString(raw), self._resource(rid), scope=scope)
                for raw, rid, scope in zip(*(c.to_pylist() for c in picked.columns),
                                           strict=True)]

    def _resource(self, rid: int) -> dict[str, AttributeValue]:
        resource = self._decoded_resources.get(rid)
        if resource is None:
            resource = self._decoded_resources[rid] = resource_attributes(
                self._raw_resources[rid])
        return resource

    def linked(self) -> frozenset[int]:
        """The positions of the spans that carry links (to other traces, or their own)."""
        if self._linked is None:
            self._linked = frozenset(i for i, pb_span in enumerate(self._pb_spans)
                                     if pb_span.links)
        return self._linked

    def link_targets(self, i: int) -> list[str]:
        """The trace ids span ``i`` links to, read without decoding its attributes."""
        if self._table is None:
            return [link.trace_id.hex() for link in self._pb_spans[i].links]
        return [link.trace_id for link in self.decode(i).links]

    def resources(self) -> dict[int, bytes]:
        """The serialised resources of the batch's spans, by ``resource_id``."""
        if not self._raw_resources:
            self._raw_resources = {resource_id(raw): raw for raw in set(self.raw_resource)}
        return self._raw_resources

    def table(self) -> pa.Table:
        """The spans as rows of the store's spans table (SPAN_COLUMNS), built once."""
        if self._table is None:
            ids = {raw: i for i, raw in self.resources().items()}
            self._table = pa.Table.from_arrays(
                [
                    self.trace_id, self.span_id, self.parent_span_id, self.name, self.service,
                    self.scope, self.kind, self.start_ns, self.end_ns, self.status_code,
                    self.status_message,
                    pa.repeat(pa.scalar(self.received_ns, pa.int64()), len(self)), self.raw,
                    # The spans of one resource share one bytes object: identity hits.
                    [ids[raw] for raw in self.raw_resource],
                ],
                schema=SPAN_COLUMNS,
            )
        return self._table

    def to_wire(self) -> WireBatch:
        """What a decode worker sends back: the table as Arrow IPC (one buffer copy, no
        per-span pickling) and the little that is not in it."""
        sink = pa.BufferOutputStream()
        table = self.table()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return WireBatch(sink.getvalue().to_pybytes(), self.received_ns, self.rejected,
                         self.problems, self.resources(), sorted(self.linked()))

    @classmethod
    def from_wire(cls, wire: WireBatch) -> SpanBatch:
        table = pa.ipc.open_stream(wire.table).read_all()
        return cls(
            received_ns=wire.received_ns, rejected=wire.rejected, problems=wire.problems,
            _table=table, _raw_resources=wire.resources, _linked=frozenset(wire.linked),
            _from_wire=True,
        )

    @property
    def rejection_message(self) -> str:
        """What OTLP partial success reports: the first few problems, and how many in all."""
        if not self.problems:
            return ""
        shown = "; ".join(self.problems[:5])
        more = len(self.problems) - 5
        return shown + (f"; and {more} more" if more > 0 else "")

    def _keep(self, indices: list[int]) -> None:
        """Keep only the accepted spans at ``indices`` (in order), in every per-span column."""
        self._distinct.clear()
        for column in fields(self):
            values = getattr(self, column.name)
            if isinstance(values, list) and column.name not in ("problems", "_resources"):
                setattr(self, column.name, [values[k] for k in indices])


@dataclass(frozen=True)
class WireBatch:
    """A SpanBatch in transit between processes (see SpanBatch.to_wire)."""

    table: bytes  # Arrow IPC stream of SPAN_COLUMNS rows
    received_ns: int
    rejected: int
    problems: list[str]
    resources: dict[int, bytes]
    linked: list[int]


def _recheck(
    batch: SpanBatch, request: ExportTraceServiceRequest, limits: SpanLimits, *, deep: bool,
    skipped: set[tuple[int, ...]],
) -> None:
    """Reject the accepted spans over the limits that ``batch_from_request`` checks once per
    request: too many events or links, or (``deep``) values nested too deep. Slow, and run only
    for a request that the cheap check says holds such a span. ``skipped`` holds the positions
    ``(r,)`` of rejected resources and ``(r, s, i)`` of rejected spans: the others are the
    batch's spans, in order."""
    k, rejected = -1, []
    for r, pb_resource_spans in enumerate(request.resource_spans):
        if (r,) in skipped:
            continue
        for s, pb_scope_spans in enumerate(pb_resource_spans.scope_spans):
            for i, pb_span in enumerate(pb_scope_spans.spans):
                if (r, s, i) in skipped:
                    continue
                k += 1
                too_many = (
                    len(pb_span.events) > limits.max_events_per_span
                    or len(pb_span.links) > limits.max_links_per_span
                )
                if not too_many and not deep:
                    continue
                if too_many or probe(batch.raw[k], limits.max_value_depth) is None:
                    problem = span_problem(pb_span, limits)
                    if problem is not None:
                        rejected.append(k)
                        batch.problems.append(
                            f"resource_spans[{r}].scope_spans[{s}].spans[{i}]: {problem}")
    if rejected:
        dropped = set(rejected)
        batch.rejected += len(dropped)
        batch._keep([k for k in range(len(batch)) if k not in dropped])


@dataclass(slots=True)
class _Scope:
    """What the spans of one scope_spans share."""

    service: str
    raw_resource: bytes
    resource_index: int
    name: str = ""


def _read_columns(batch: SpanBatch, pb_spans: list[PbSpan], raws: list[bytes], scope: _Scope,
                  limits: SpanLimits) -> bool:
    """Append the spans of one scope_spans column by column, if every one of them is within
    the per-span checks; False (nothing appended) if any is not. One comprehension per field
    costs a fraction of a Python loop over spans; a scope with a bad span is read again by
    ``_read_one_by_one``, which names it."""
    trace_ids = [pb_span.trace_id for pb_span in pb_spans]
    span_ids = [pb_span.span_id for pb_span in pb_spans]
    parent_ids = [pb_span.parent_span_id for pb_span in pb_spans]
    starts = [pb_span.start_time_unix_nano for pb_span in pb_spans]
    ends = [pb_span.end_time_unix_nano for pb_span in pb_spans]
    kinds = [pb_span.kind for pb_span in pb_spans]
    statuses = [pb_span.status for pb_span in pb_spans]
    codes = [status.code for status in statuses]
    distinct_traces = set(trace_ids)
    if not (
        {len(t) for t in distinct_traces} == {16} and ZERO_TRACE not in distinct_traces
        and set(map(len, span_ids)) == {8} and ZERO_SPAN not in span_ids
        and set(map(len, parent_ids)) <= {0, 8}
        and max(map(len, raws)) <= limits.max_attribute_value_bytes
        and max(starts) <= MAX_TIME_NS and max(ends) <= MAX_TIME_NS
        and min(kinds) >= 0 and max(kinds) <= SPAN_KIND_MAX
        and min(codes) >= 0 and max(codes) <= STATUS_CODE_MAX
        and max([len(pb_span.attributes) for pb_span in pb_spans])
        <= limits.max_attributes_per_span
    ):
        return False
    n = len(pb_spans)
    batch.trace_id += [t.hex() for t in trace_ids]
    batch.span_id += [i.hex() for i in span_ids]
    batch.parent_span_id += [i.hex() for i in parent_ids]
    batch.name += [pb_span.name for pb_span in pb_spans]
    batch.service += [scope.service] * n
    batch.scope += [scope.name] * n
    batch.kind += kinds
    batch.start_ns += starts
    batch.end_ns += ends
    batch.status_code += codes
    batch.status_message += [status.message for status in statuses]
    batch.raw += raws
    batch.raw_resource += [scope.raw_resource] * n
    batch._pb_spans += pb_spans
    batch._resource_of += [scope.resource_index] * n
    return True


def _read_one_by_one(
    batch: SpanBatch, pb_spans: list[PbSpan], raws: list[bytes], scope: _Scope,
    limits: SpanLimits, where: tuple[int, int], skipped: set[tuple[int, ...]],
) -> None:
    """Append the spans of one scope_spans that pass the per-span checks; reject the others,
    each with its reason (and its position in ``skipped``)."""
    r, s = where
    for i, pb_span in enumerate(pb_spans):
        trace_id, span_id, status = pb_span.trace_id, pb_span.span_id, pb_span.status
        kind, code = pb_span.kind, status.code
        cheap_check_fails = (
            len(trace_id) != 16 or trace_id == ZERO_TRACE or len(span_id) != 8
            or span_id == ZERO_SPAN or len(pb_span.parent_span_id) not in (0, 8)
            or len(raws[i]) > limits.max_attribute_value_bytes
            or len(pb_span.attributes) > limits.max_attributes_per_span
            or pb_span.start_time_unix_nano > MAX_TIME_NS
            or pb_span.end_time_unix_nano > MAX_TIME_NS
            or not 0 <= kind <= SPAN_KIND_MAX or not 0 <= code <= STATUS_CODE_MAX
        )
        problem = span_problem(pb_span, limits) if cheap_check_fails else None
        if problem is not None:
            batch.rejected += 1
            batch.problems.append(f"resource_spans[{r}].scope_spans[{s}].spans[{i}]: {problem}")
            skipped.add((r, s, i))
            continue
        batch.trace_id.append(trace_id.hex())
        batch.span_id.append(span_id.hex())
        batch.parent_span_id.append(pb_span.parent_span_id.hex())
        batch.name.append(pb_span.name)
        batch.service.append(scope.service)
        batch.scope.append(scope.name)
        batch.kind.append(kind)
        batch.start_ns.append(pb_span.start_time_unix_nano)
        batch.end_ns.append(pb_span.end_time_unix_nano)
        batch.status_code.append(code)
        batch.status_message.append(status.message)
        batch.raw.append(raws[i])
        batch.raw_resource.append(scope.raw_resource)
        batch._pb_spans.append(pb_span)
        batch._resource_of.append(scope.resource_index)


def batch_from_request(
    request: ExportTraceServiceRequest,
    *,
    received_ns: int,
    limits: SpanLimits = DEFAULT_LIMITS,
    body: bytes | None = None,
) -> SpanBatch:
    """Validate ids and limits and read the scalar columns of every span of ``request``.

    Spans with ids of the wrong length, over ``limits``, with a start or end time past
    MAX_TIME_NS, or with a kind or status code that OTLP does not define are rejected one by one
    (counted in ``rejected``, named in ``problems``), as OTLP partial success expects; the rest
    are accepted. So every value that reaches a typed column of the store fits it. (Dropped
    counts, flags and event times reach no column: they stay in ``raw``, as sent.) A request
    with no spans gives an empty batch: exporters do send them, and OTLP counts them a success.

    The limits cost little per span, and no attribute is decoded unless a span is over one:
    ``len(attributes)`` is read for every span, and the size of the span's serialised bytes
    (made anyway, for ``raw``) bounds its largest value, so only a span larger than
    ``max_attribute_value_bytes`` has its values measured. Nesting depth and the numbers of
    events and links are checked once per request, by parsing all accepted spans at once into
    a probe type (see otlp_probe.py); only when that finds a problem is each span rechecked.

    ``body``, the serialised ``request`` when the caller has it, is where ``raw`` is cut from
    (otlp_probe.raw_spans): cheaper than serialising each span again.
    """
    batch = SpanBatch(received_ns=received_ns)
    skipped: set[tuple[int, ...]] = set()  # rejected resources (r,) and spans (r, s, i)
    as_sent = raw_spans(body) if body is not None else None
    for r, pb_resource_spans in enumerate(request.resource_spans):
        raw_resource = pb_resource_spans.resource.SerializeToString()
        problem = resource_problem(pb_resource_spans.resource, raw_resource, limits)
        if problem is not None:
            # Checked before the resource is decoded: that is done in Python, in full.
            count = sum(len(pb_scope_spans.spans) for pb_scope_spans in
                        pb_resource_spans.scope_spans)
            if count:
                batch.rejected += count
                batch.problems.append(
                    f"resource_spans[{r}].resource: {problem} (its {count} spans are rejected)"
                )
            skipped.add((r,))
            continue
        resource = attributes(pb_resource_spans.resource.attributes)
        service_value = resource.get("service.name")
        scope_of = _Scope(
            service=service_value if isinstance(service_value, str) else "",
            raw_resource=raw_resource, resource_index=len(batch._resources))
        batch._resources.append(resource)
        for s, pb_scope_spans in enumerate(pb_resource_spans.scope_spans):
            pb_spans = list(pb_scope_spans.spans)
            if not pb_spans:
                continue
            scope_of.name = pb_scope_spans.scope.name
            raws = None if as_sent is None else as_sent[r][s]
            if raws is None or len(raws) != len(pb_spans):
                raws = [pb_span.SerializeToString() for pb_span in pb_spans]
            if not _read_columns(batch, pb_spans, raws, scope_of, limits):
                _read_one_by_one(batch, pb_spans, raws, scope_of, limits, (r, s), skipped)
    if batch.raw:
        probe_of_all = probe(b"".join(batch.raw), limits.max_value_depth)
        if probe_of_all is None:
            _recheck(batch, request, limits, deep=True, skipped=skipped)
        elif (
            len(probe_of_all.f11) > limits.max_events_per_span
            or len(probe_of_all.f13) > limits.max_links_per_span
        ):
            _recheck(batch, request, limits, deep=False, skipped=skipped)
        elif not probe_of_all.f13:
            batch._linked = frozenset()  # no span of the request links: none to look for
    return batch


def parse_protobuf(body: bytes) -> ExportTraceServiceRequest:
    """Binary OTLP; raise InvalidPayload for bytes that are not an ExportTraceServiceRequest
    (invalid UTF-8 in a string field among them: protobuf refuses the whole message).

    An empty body is a valid, empty request."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        reason = str(exc)
        if "UTF-8" in reason:
            reason = f"a string field holds invalid UTF-8 ({reason})"
        elif "MaxDepth" in reason:
            reason = f"messages nested too deeply ({reason})"
        raise InvalidPayload(f"invalid protobuf ExportTraceServiceRequest: {reason}") from exc
    return request
