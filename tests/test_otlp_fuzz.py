"""Property-based fuzzing of the OTLP decoders (hypothesis), seeded with tests/corpus/otlp/.

Whatever the bytes, decoding ends in a SpanBatch or an InvalidPayload, never in another
exception; and what is accepted is exactly what a plain-Python oracle of the limits accepts.
Derandomized, so CI runs the same examples every time; tests/fuzz/fuzz_otlp.py (atheris) is the
open-ended, coverage-guided counterpart.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from outcomewatch.errors import InvalidPayload
from outcomewatch.otlp import SpanBatch, batch_from_request, parse_protobuf
from outcomewatch.otlp_limits import SpanLimits
from outcomewatch.receiver.otlp_json import parse_json

CORPUS = Path(__file__).resolve().parent / "corpus" / "otlp"
SEEDS = {path.name: path.read_bytes() for path in sorted(CORPUS.iterdir())
         if path.suffix in (".bin", ".json")}
FUZZ = settings(
    derandomize=True, max_examples=200, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def with_seeds(suffix: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """@example every corpus file ending in ``suffix`` (hypothesis runs them first)."""
    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        for name, data in SEEDS.items():
            if name.endswith(suffix):
                test = example(data)(test)
        return test
    return decorate


def _event(what: str) -> None:
    """Counted in --hypothesis-show-statistics: how deep the examples reach."""
    if currently_in_test_context():
        event(what)


def decode_or_refuse(decode: Callable[[bytes], ExportTraceServiceRequest], data: bytes,
                     limits: SpanLimits | None = None) -> SpanBatch | None:
    """The batch, or None when refused with InvalidPayload; any other exception fails."""
    try:
        request = decode(data)
    except InvalidPayload:
        _event("refused")
        return None
    limits = limits or SpanLimits()
    if decode is parse_protobuf:  # as the receivers do: each span's bytes cut from the body
        batch = batch_from_request(request, received_ns=1, limits=limits, body=data)
        reserialised = batch_from_request(request, received_ns=1, limits=limits)
        assert batch.problems == reserialised.problems
        assert batch.name == reserialised.name
        assert [PbSpan.FromString(raw) for raw in batch.raw] == [
            PbSpan.FromString(raw) for raw in reserialised.raw]
    else:
        batch = batch_from_request(request, received_ns=1, limits=limits)
    _event("spans accepted" if len(batch) else "no span accepted")
    _event("some spans rejected" if batch.rejected else "no span rejected")
    total = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
    assert len(batch) + batch.rejected == total
    for column in (batch.trace_id, batch.name, batch.raw, batch.service, batch.kind):
        assert len(column) == len(batch)
    for i in range(len(batch)):
        assert PbSpan.FromString(batch.raw[i]).name == batch.name[i]
    return batch


# -- (a) arbitrary and mutated bytes -------------------------------------------------------------

@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few bytes replaced, inserted or deleted, or cut short."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        if edit == "insert" or (edit == "replace" and at == len(data)):
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif edit == "replace":
            data[at] = draw(st.integers(0, 255))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            del data[at:]
    return bytes(data)


# Mutating a valid request reaches further than random bytes, which protobuf mostly refuses.
SMALL_BIN_SEEDS = [data for name, data in SEEDS.items() if name.endswith(".bin")
                   and not name.startswith("invalid-") and 0 < len(data) < 4096]


@FUZZ
@given(st.one_of(mutated(SMALL_BIN_SEEDS), mutated(SMALL_BIN_SEEDS), st.binary(max_size=512)))
@with_seeds(".bin")
def test_any_bytes_decode_to_a_batch_or_are_refused_as_invalid_protobuf(data):
    decode_or_refuse(parse_protobuf, data)
    decode_or_refuse(parse_protobuf, data, SpanLimits(
        max_attributes_per_span=2, max_attribute_value_bytes=8, max_value_depth=1,
        max_events_per_span=1, max_links_per_span=1,
    ))


# -- (b) structured requests against an oracle of the limits -------------------------------------

scalars: st.SearchStrategy[AnyValue] = st.one_of(
    st.builds(AnyValue),
    st.text(max_size=12).map(lambda s: AnyValue(string_value=s)),
    st.binary(max_size=12).map(lambda b: AnyValue(bytes_value=b)),
    st.booleans().map(lambda b: AnyValue(bool_value=b)),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: AnyValue(int_value=i)),
    st.floats(allow_nan=False).map(lambda f: AnyValue(double_value=f)),
)


def _array(values: list[AnyValue]) -> AnyValue:
    value = AnyValue()
    value.array_value.SetInParent()  # an empty array is still an array
    value.array_value.values.extend(values)
    return value


def _kvlist(items: list[tuple[str, AnyValue]]) -> AnyValue:
    value = AnyValue()
    value.kvlist_value.SetInParent()
    value.kvlist_value.values.extend(KeyValue(key=k, value=v) for k, v in items)
    return value


def _containers(children: st.SearchStrategy[AnyValue]) -> st.SearchStrategy[AnyValue]:
    return st.lists(children, max_size=3).map(_array) | st.lists(
        st.tuples(st.text(max_size=6), children), max_size=3
    ).map(_kvlist)


@st.composite
def deep_values(draw: st.DrawFn) -> AnyValue:
    """A chain of up to 10 arrays and kvlists, mixed, around one scalar."""
    value = draw(scalars)
    for _ in range(draw(st.integers(0, 10))):
        value = _array([value]) if draw(st.booleans()) else _kvlist([("k", value)])
    return value


values = st.recursive(scalars, _containers, max_leaves=8) | deep_values()
attribute_lists = st.lists(st.tuples(st.text(max_size=10), values), max_size=4)
bad_ids = st.binary(max_size=20) | st.sampled_from([bytes(8), bytes(16)])
int32 = st.integers(-(2**31), 2**31 - 1)


@st.composite
def ids(draw: st.DrawFn, size: int) -> bytes:
    """Mostly ids of ``size`` bytes; one in ten of any length (0..20), or all zeros."""
    if draw(st.integers(0, 9)) == 0:
        return draw(bad_ids)
    return draw(st.binary(min_size=size, max_size=size))


@st.composite
def spans(draw: st.DrawFn) -> PbSpan:
    span = PbSpan(
        trace_id=draw(ids(16)),
        span_id=draw(ids(8)),
        parent_span_id=draw(st.just(b"") | ids(8)),
        name=draw(st.text(max_size=20)),
        # Mostly values OTLP defines, so that most spans are accepted; any int32 or uint64 too.
        kind=draw(st.integers(0, 5) | int32),  # type: ignore[arg-type]
        start_time_unix_nano=draw(st.integers(0, 2**63 - 1) | st.integers(0, 2**64 - 1)),
    )
    span.status.code = draw(st.integers(0, 2) | int32)  # type: ignore[assignment]
    span.attributes.extend(KeyValue(key=k, value=v) for k, v in draw(attribute_lists))
    for _ in range(draw(st.integers(0, 2))):
        span.events.add(name="e").attributes.extend(
            KeyValue(key=k, value=v) for k, v in draw(attribute_lists))
    for _ in range(draw(st.integers(0, 2))):
        span.links.add(trace_id=draw(ids(16)), span_id=draw(ids(8))).attributes.extend(
            KeyValue(key=k, value=v) for k, v in draw(attribute_lists))
    return span


@st.composite
def requests(draw: st.DrawFn) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(1, 2))):
        resource_spans = request.resource_spans.add()
        resource_spans.resource.attributes.extend(KeyValue(key=k, value=v) for k, v in draw(
            st.lists(st.tuples(st.text(max_size=10), scalars), max_size=2)))
        for _ in range(draw(st.integers(1, 2))):
            resource_spans.scope_spans.add().spans.extend(draw(st.lists(spans(), max_size=3)))
    return request


limit_settings = st.just(SpanLimits()) | st.builds(
    SpanLimits, max_attributes_per_span=st.integers(1, 5),
    max_attribute_value_bytes=st.integers(1, 16), max_value_depth=st.integers(1, 9),
    max_events_per_span=st.integers(1, 2), max_links_per_span=st.integers(1, 2),
)


def _depth(value: AnyValue) -> int:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return 1 + max((_depth(v) for v in value.array_value.values), default=0)
    if kind == "kvlist_value":
        return 1 + max((_depth(kv.value) for kv in value.kvlist_value.values), default=0)
    return 0


def _largest(value: AnyValue) -> int:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return len(value.string_value.encode())
    if kind == "bytes_value":
        return len(value.bytes_value)
    if kind == "array_value":
        return max((_largest(v) for v in value.array_value.values), default=0)
    if kind == "kvlist_value":
        return max((max(len(kv.key.encode()), _largest(kv.value))
                    for kv in value.kvlist_value.values), default=0)
    return 0


def _attributes_fit(attributes: list[KeyValue], limits: SpanLimits) -> bool:
    return all(
        len(kv.key.encode()) <= limits.max_attribute_value_bytes
        and _largest(kv.value) <= limits.max_attribute_value_bytes
        and _depth(kv.value) <= limits.max_value_depth
        for kv in attributes
    )


def oracle_accepts(span: PbSpan, limits: SpanLimits) -> bool:
    """The limits, restated as plainly as possible."""
    return (
        len(span.trace_id) == 16 and span.trace_id != bytes(16)
        and len(span.span_id) == 8 and span.span_id != bytes(8)
        and len(span.parent_span_id) in (0, 8)
        and 0 <= span.kind <= 5 and 0 <= span.status.code <= 2
        and span.start_time_unix_nano < 2**63 and span.end_time_unix_nano < 2**63
        and len(span.attributes) <= limits.max_attributes_per_span
        and len(span.events) <= limits.max_events_per_span
        and len(span.links) <= limits.max_links_per_span
        and all(_attributes_fit(list(attributes), limits) for attributes in
                [span.attributes, *(e.attributes for e in span.events),
                 *(link.attributes for link in span.links)])
    )


@FUZZ
@given(requests(), limit_settings)
def test_exactly_the_spans_within_the_limits_are_accepted_and_read_back_exactly(request, limits):
    batch = decode_or_refuse(parse_protobuf, request.SerializeToString(), limits)
    assert batch is not None
    expected = [
        span
        for resource_spans in request.resource_spans
        if len(resource_spans.resource.attributes) <= limits.max_attributes_per_span
        and _attributes_fit(list(resource_spans.resource.attributes), limits)
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
        if oracle_accepts(span, limits)
    ]
    assert batch.name == [span.name for span in expected]
    assert batch.trace_id == [span.trace_id.hex() for span in expected]
    assert batch.span_id == [span.span_id.hex() for span in expected]
    assert batch.kind == [span.kind for span in expected]
    assert batch.status_code == [span.status.code for span in expected]
    assert batch.raw == [span.SerializeToString() for span in expected]
    assert len(batch.problems) <= batch.rejected


# -- (c) JSON ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
VALID_JSON = json.loads(SEEDS["valid-otlp.json"])


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, (*path, index))
    return found


@st.composite
def mutated_documents(draw: st.DrawFn) -> bytes:
    """The valid OTLP/JSON seed with one node replaced by any JSON value (or dropped)."""
    document = json.loads(json.dumps(VALID_JSON))
    path = draw(st.sampled_from(_paths(document)[1:]))
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    if draw(st.booleans()):
        parent[path[-1]] = draw(json_values)
    else:
        del parent[path[-1]]
    return json.dumps(document).encode()


@FUZZ
@given(json_values.map(lambda v: json.dumps(v).encode()) | mutated_documents()
       | st.binary(max_size=64))
@with_seeds(".json")
def test_any_json_decodes_to_a_batch_or_is_refused_as_invalid(data):
    decode_or_refuse(parse_json, data)


def to_otlp_json(request: ExportTraceServiceRequest) -> bytes:
    """The protobuf JSON mapping with hex ids: OTLP/JSON as an exporter writes it."""
    document = json_format.MessageToDict(request)
    for resource_spans in document.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for holder in (span, *span.get("links", [])):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in holder:
                            holder[key] = base64.b64decode(holder[key]).hex()
    return json.dumps(document).encode()


@settings(FUZZ, max_examples=60)  # json_format is slow: a few ms per request
@given(requests())
def test_otlp_json_of_any_request_reads_back_as_the_same_request(request):
    assert parse_json(to_otlp_json(request)) == request


# -- the corpus ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_corpus_file_decodes_as_its_name_says(name):
    decode = parse_json if name.endswith(".json") else parse_protobuf
    batch = decode_or_refuse(decode, SEEDS[name])
    if name.startswith("invalid-"):
        assert batch is None
    else:
        assert batch is not None
        assert (batch.rejected > 0) == name.startswith("partial-")
