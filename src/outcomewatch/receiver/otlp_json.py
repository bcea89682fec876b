"""OTLP/JSON request bodies -> ExportTraceServiceRequest.

OTLP/JSON is the protobuf JSON mapping with one difference that matters: trace and span ids
are hex, not base64 (case-insensitive, as the OTLP spec says: uppercase hex gives the same
bytes, so ids are stored lowercase). Field names may be lowerCamelCase or snake_case, enums
integers or their known names (the spec asks senders for integers; an unknown name is refused,
not read as 0); unknown fields are ignored, as the OTLP spec asks of receivers. A key given twice
in one object is refused: which of its values counts differs between parsers.

The document is checked against the message descriptors, field by field, before
``json_format.ParseDict`` sees it, for two reasons: ParseDict silently accepts a string where
an object is expected (it iterates the string's characters as field names, all unknown), and it
names a bad field only as a chain of "Failed to parse X field" with no index. Here every type
error is reported with its path, e.g. ``resourceSpans[0].scopeSpans[0].spans[2].traceId: must
be a hex string, got int``.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from outcomewatch.errors import InvalidPayload

# The bytes fields that OTLP/JSON writes as hex (in Span and Span.Link); every other bytes
# field (AnyValue.bytes_value) is base64, as in the protobuf mapping.
_HEX_FIELDS = frozenset({"trace_id", "span_id", "parent_span_id"})
# Messages nested in one document (an AnyValue array level is two): json_format's own limit.
MAX_DEPTH = 100

_F = FieldDescriptor
_INT_RANGES = {
    _F.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    _F.CPPTYPE_UINT32: (0, 2**32 - 1),
    _F.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    _F.CPPTYPE_UINT64: (0, 2**64 - 1),
    _F.CPPTYPE_ENUM: (-(2**31), 2**31 - 1),
}
_FLOAT_WORDS = frozenset({"NaN", "Infinity", "-Infinity"})
_NUMBER = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")  # standard or URL-safe, padding optional


def parse_json(body: bytes) -> ExportTraceServiceRequest:
    """An OTLP/JSON body as a request; raise InvalidPayload naming the offending field.

    An empty (or blank) body is an empty request, as an empty protobuf body is: exporters may
    send one, and OTLP counts it a success.
    """
    if not body.strip():
        return ExportTraceServiceRequest()
    try:
        document = json.loads(body, object_pairs_hook=_object)
    except ValueError as exc:  # bad JSON or encoding, or an integer of over 4300 digits
        raise InvalidPayload(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        # A body like b"[" * 100_000 is cheap to send; it must be a 400, not a crash.
        raise InvalidPayload("invalid JSON: nested too deeply") from exc
    if not isinstance(document, dict):
        raise InvalidPayload("invalid OTLP/JSON: the body must be a JSON object")
    _check_message(document, ExportTraceServiceRequest.DESCRIPTOR, "", 0)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        # What the checks above do not cover (a oneof set twice, a field given under both of
        # its names, bad base64): json_format's message, its chain turned into a path.
        raise InvalidPayload(f"invalid OTLP/JSON: {_tidy(str(exc))}") from exc
    return request


class _Repeated(dict[str, Any]):
    """A JSON object that repeated a key (the last value kept, as json.loads does); refused
    once the check reaches it, so that the error can say where it is."""

    __slots__ = ("repeated",)
    repeated: str


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    repeated = _Repeated(obj)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            repeated.repeated = key
            break
        seen.add(key)
    return repeated


@functools.cache
def _fields(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    by_name = {field.name: field for field in descriptor.fields}
    return by_name | {field.json_name: field for field in descriptor.fields}


def _type(value: Any) -> str:
    return type(value).__name__


def _check_message(obj: dict[str, Any], descriptor: Descriptor, where: str, depth: int) -> None:
    """Check every known field of ``obj`` (a ``descriptor`` message) and turn hex ids to base64
    in place; raise InvalidPayload with the path of the first field of the wrong type."""
    if depth > MAX_DEPTH:
        raise InvalidPayload(f"{where}: nested more than {MAX_DEPTH} messages deep")
    if isinstance(obj, _Repeated):
        # Which value counts would be the parser's choice, and not every parser's the same.
        raise InvalidPayload(f"{where + ': ' if where else ''}duplicate key {obj.repeated!r}"
                             " (a key may appear once per object)")
    fields = _fields(descriptor)
    for key, value in obj.items():
        field = fields.get(key)
        if field is None or value is None:
            continue  # unknown fields are ignored; null is the default value
        path = f"{where}.{key}" if where else key
        if not field.is_repeated:
            obj[key] = _check_value(value, field, path, depth)
            continue
        if not isinstance(value, list):
            raise InvalidPayload(f"{path}: must be a list, got {_type(value)}")
        for k, item in enumerate(value):
            value[k] = _check_value(item, field, f"{path}[{k}]", depth)


def _check_value(value: Any, field: FieldDescriptor, path: str, depth: int) -> Any:
    """``value`` if it fits ``field`` (a hex id as base64); raise InvalidPayload if not."""
    cpp_type = field.cpp_type
    if cpp_type == _F.CPPTYPE_MESSAGE:
        if not isinstance(value, dict):
            raise InvalidPayload(f"{path}: must be an object, got {_type(value)}")
        assert field.message_type is not None  # set on every message field
        _check_message(value, field.message_type, path, depth + 1)
    elif field.type == _F.TYPE_BYTES and field.name in _HEX_FIELDS:
        if not isinstance(value, str):
            raise InvalidPayload(f"{path}: must be a hex string, got {_type(value)}")
        try:
            return base64.b64encode(bytes.fromhex(value)).decode("ascii")
        except ValueError as exc:
            raise InvalidPayload(f"{path}: {value[:40]!r} is not hex") from exc
    elif cpp_type == _F.CPPTYPE_STRING:
        if not isinstance(value, str):
            raise InvalidPayload(f"{path}: must be a string, got {_type(value)}")
        if field.type == _F.TYPE_BYTES and _BASE64.fullmatch(value) is None:
            raise InvalidPayload(f"{path}: {value[:40]!r} is not base64")
    elif cpp_type == _F.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            raise InvalidPayload(f"{path}: must be true or false, got {_type(value)}")
    elif cpp_type in (_F.CPPTYPE_DOUBLE, _F.CPPTYPE_FLOAT):
        _check_number(value, path)
    elif cpp_type == _F.CPPTYPE_ENUM and isinstance(value, str):
        # OTLP/JSON sends enums as integers; a known name is accepted too (the protobuf JSON
        # mapping's form, which some exporters write), an unknown one would read as 0.
        assert field.enum_type is not None  # set on every enum field
        if value not in field.enum_type.values_by_name:
            names = ", ".join(field.enum_type.values_by_name)
            raise InvalidPayload(
                f"{path}: {value[:40]!r} is not a {field.enum_type.name}: OTLP/JSON sends enums "
                f"as integers (these names are accepted too: {names})"
            )
    else:
        _check_integer(value, _INT_RANGES[cpp_type], path)
    return value


def _check_number(value: Any, path: str) -> None:
    if isinstance(value, str):
        if value not in _FLOAT_WORDS and _NUMBER.fullmatch(value) is None:
            raise InvalidPayload(f"{path}: {value[:40]!r} is not a number")
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidPayload(f"{path}: must be a number, got {_type(value)}")


def _check_integer(value: Any, bounds: tuple[int, int], path: str) -> None:
    """An integer, as a JSON number or (for 64-bit fields, usually) a decimal string."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidPayload(f"{path}: must be an integer, got {_type(value)}")
    if isinstance(value, str):
        if re.fullmatch(r"-?[0-9]{1,20}", value) is None:
            raise InvalidPayload(f"{path}: {value[:40]!r} is not an integer")
        value = int(value)
    elif isinstance(value, float) and not value.is_integer():
        raise InvalidPayload(f"{path}: {value!r} is not an integer")
    if not bounds[0] <= value <= bounds[1]:
        raise InvalidPayload(f"{path}: {value} is out of range")


def _tidy(message: str) -> str:
    """json_format's 'Failed to parse a field: Failed to parse b field: reason at
    ExportTraceServiceRequest.a[0].b....' as 'a[0].b: reason' (or 'a.b: reason')."""
    chain = re.match(r"((?:Failed to parse \w+ field: )*)(.*)", message.rstrip("."), re.DOTALL)
    assert chain is not None  # the pattern matches any string
    path, reason = ".".join(re.findall(r"Failed to parse (\w+) field", chain[1])), chain[2]
    located = re.search(r' at "?ExportTraceServiceRequest\.([^"\s]+)"?$', reason)
    if located is not None:
        path, reason = located[1], reason[: located.start()]
    return f"{path}: {reason}" if path else reason
