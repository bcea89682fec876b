"""Protobuf message types that read a serialised OTLP request or span for one purpose, at C
speed, instead of walking it in Python:

- ``raw_spans(body)``: each span's own bytes, as they lie in the request (the store keeps them;
  re-serialising each parsed span would cost more than parsing the request);
- ``probe(raw, ...)``: how deeply the attribute values of many concatenated spans (or of a
  resource) nest, and how many events and links they hold (SpanLimits, checked per request).

Both are built at run time from descriptors that mirror the OTLP types field by field (wire
compatible), so they parse exactly the bytes protobuf parses.
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

_FIELD = descriptor_pb2.FieldDescriptorProto
# The OTLP fields that a probe reads past, by field number. Declared, because upb decodes an
# unknown field more slowly than a known one; "bytes" stands for strings and sub-messages too.
_PROBE_SCALARS = {
    "Span": {7: "fixed64", 8: "fixed64", 16: "fixed32"}
    | dict.fromkeys((1, 2, 3, 4, 5, 15), "bytes") | dict.fromkeys((6, 10, 12, 14), "uint64"),
    "Event": {1: "fixed64", 2: "bytes", 4: "uint64"},
    "Link": {1: "bytes", 2: "bytes", 3: "bytes", 5: "uint64", 6: "fixed32"},
    "Resource": {2: "uint64"},
    "KeyValue": {1: "bytes"},
    "Value": {1: "bytes", 2: "uint64", 3: "uint64", 4: "fixed64", 7: "bytes"},
}


@functools.cache
def _probe_types(max_depth: int) -> tuple[type[Message], type[Message]]:
    """Message types that parse a Span (and a Resource) keeping only how attribute values nest.

    They mirror the OTLP types (wire-compatible, strings read as bytes) with the path down to
    nested values made *singular*: protobuf merges the repeated occurrences of a singular
    message field, so the attributes of all the spans of a buffer of concatenated spans fold
    into one tree of at most ``max_depth + 1`` levels: a few allocations per request, none per
    attribute. Past ``max_depth`` the tree ends in a message whose required field is of its own
    type, which no finite input can set: ``IsInitialized()`` is False exactly when some value
    nests too deep. Events and links stay repeated, so that their numbers can be read.
    """
    package = f"outcomewatch.probe{max_depth}"
    file = descriptor_pb2.FileDescriptorProto(
        name=f"outcomewatch/probe{max_depth}.proto", package=package, syntax="proto2"
    )

    def message(name: str, fields: dict[int, str], *, label: int = _FIELD.LABEL_OPTIONAL,
                repeated: tuple[int, ...] = ()) -> None:
        """Message ``name`` (as Value3 or Value) with message-typed ``fields`` by number."""
        pb_message = file.message_type.add(name=name)
        for number, scalar in _PROBE_SCALARS.get(name.rstrip("0123456789"), {}).items():
            pb_message.field.add(name=f"f{number}", number=number, label=_FIELD.LABEL_OPTIONAL,
                                 type=getattr(_FIELD, f"TYPE_{scalar.upper()}"))
        for number, type_name in fields.items():
            pb_message.field.add(
                name=f"f{number}", number=number, type=_FIELD.TYPE_MESSAGE,
                label=_FIELD.LABEL_REPEATED if number in repeated else label,
                type_name=f".{package}.{type_name}",
            )

    message("TooDeep", {1: "TooDeep"}, label=_FIELD.LABEL_REQUIRED)
    for level in range(1, max_depth + 2):
        array, kvlist = f"Array{level}", f"KvList{level}"
        if level > max_depth:
            array = kvlist = "TooDeep"
        else:
            message(array, {1: f"Value{level + 1}"})
            message(kvlist, {1: f"KeyValue{level + 1}"})
        message(f"Value{level}", {5: array, 6: kvlist})
        message(f"KeyValue{level}", {2: f"Value{level}"})
    message("Event", {3: "KeyValue1"})
    message("Link", {4: "KeyValue1"})
    message("Span", {9: "KeyValue1", 11: "Event", 13: "Link"}, repeated=(11, 13))
    message("Resource", {1: "KeyValue1"})
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.Span")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.Resource")),
    )


def probe(raw: bytes, max_depth: int, *, resource: bool = False) -> Any:
    """``raw`` (concatenated spans, or a resource) parsed by a probe type; None when a value
    nests deeper than the limit (or the probe cannot parse it, which says the same)."""
    probe_type = _probe_types(max_depth)[1 if resource else 0]
    try:
        probe = probe_type.FromString(raw)
    except DecodeError:
        return None
    return probe if probe.IsInitialized() else None




@functools.cache
def _raw_request_type() -> type[Message]:
    """ExportTraceServiceRequest with each span read as bytes (proto2, fields as in OTLP)."""
    package = "outcomewatch.raw"
    file = descriptor_pb2.FileDescriptorProto(
        name="outcomewatch/raw.proto", package=package, syntax="proto2")
    for name, number, type_name in (("Request", 1, "ResourceSpans"),
                                    ("ResourceSpans", 2, "ScopeSpans"), ("ScopeSpans", 2, None)):
        pb_message = file.message_type.add(name=name)
        if type_name is None:  # ScopeSpans.spans: the span bytes themselves
            pb_message.field.add(name="spans", number=number, label=_FIELD.LABEL_REPEATED,
                                 type=_FIELD.TYPE_BYTES)
        else:
            pb_message.field.add(name="items", number=number, label=_FIELD.LABEL_REPEATED,
                                 type=_FIELD.TYPE_MESSAGE, type_name=f".{package}.{type_name}")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.Request"))


def raw_spans(body: bytes) -> list[list[list[bytes]]] | None:
    """``raw_spans(body)[r][s][i]``: the bytes of ``resource_spans[r].scope_spans[s].spans[i]``
    of the serialised ExportTraceServiceRequest ``body`` as sent (unknown fields and field order
    kept), or None if it does not parse."""
    try:
        request: Any = _raw_request_type().FromString(body)
    except DecodeError:
        return None
    return [[list(scope_spans.spans) for scope_spans in resource_spans.items]
            for resource_spans in request.items]
