"""Value types of a rule file: each an Annotated type with its validator and JSON Schema.

Validators raise PydanticCustomError with a finished message. Messages are formatted here,
without a context: pydantic would otherwise expand any "{...}" inside the user's value as a
template field.

Unions are discriminated by Python type with tags that start with ``~``. Pydantic puts a tag into
an error's ``loc``; ``TAGS`` lets the loader drop them so a location reads like the YAML path.
"""

from __future__ import annotations

import difflib
import re
from datetime import UTC, datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from cronsim import CronSim, CronSimError
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from outcomewatch.durations import bare_number_message, parse_duration
from outcomewatch.errors import DurationError

NAME_PATTERN = re.compile(r"[a-z0-9._-]+")

BOOL, INT, FLOAT, STR, OPERATORS_TAG = "~bool", "~int", "~float", "~str", "~operators"
TAGS = frozenset({BOOL, INT, FLOAT, STR, OPERATORS_TAG})

CRON_FIELDS = "minute hour day-of-month month day-of-week"


def _scalar_tag(value: Any) -> str | None:
    # bool before int: in Python, True is an int, and here it must not be one.
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return FLOAT
    if isinstance(value, str):
        return STR
    return None


def _number_tag(value: Any) -> str | None:
    tag = _scalar_tag(value)
    return tag if tag in (INT, FLOAT) else None


def condition_tag(value: Any) -> str | None:
    return OPERATORS_TAG if isinstance(value, dict) else _scalar_tag(value)


Scalar = Annotated[
    Annotated[StrictBool, Tag(BOOL)]
    | Annotated[StrictInt, Tag(INT)]
    | Annotated[StrictFloat, Tag(FLOAT)]
    | Annotated[StrictStr, Tag(STR)],
    Discriminator(
        _scalar_tag,
        custom_error_type="scalar_type",
        custom_error_message="expected a string, number or bool",
    ),
]

Number = Annotated[
    Annotated[StrictInt, Tag(INT)] | Annotated[StrictFloat, Tag(FLOAT)],
    Discriminator(
        _number_tag,
        custom_error_type="number_type",
        custom_error_message="expected a number (int or float, not bool)",
    ),
]


def _check_name(value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise PydanticCustomError(
            "rule_name",
            f"invalid rule name {value!r}: use only lowercase letters, digits, '.', '_' and '-'",
        )
    return value


def _not_a_bare_number(value: Any) -> Any:
    # YAML reads `within: 600` as an int; "expected a string" would not say what to write.
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise PydanticCustomError("duration", bare_number_message(value))
    return value


def _check_duration(value: str) -> str:
    try:
        parse_duration(value)
    except DurationError as exc:
        raise PydanticCustomError("duration", str(exc)) from exc
    return value


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except (re.error, OverflowError, RecursionError) as exc:
        raise PydanticCustomError("regex", f"invalid regex {value!r}: {exc}") from exc
    return value


def _check_cron(value: str) -> str:
    fields = len(value.split())
    try:
        if fields != 5:
            raise CronSimError(f"expected 5 fields ({CRON_FIELDS}), got {fields}")
        CronSim(value, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        message = str(exc)
        message = message[:1].lower() + message[1:]
        raise PydanticCustomError("cron", f"invalid cron expression {value!r}: {message}") from exc
    return value


def _check_tz(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        message = f"unknown time zone {value!r}"
        close = difflib.get_close_matches(value, sorted(available_timezones()), n=1)
        message += f" (did you mean {close[0]!r}?)" if close else " (use an IANA name like UTC)"
        raise PydanticCustomError("time_zone", message) from exc
    return value


def _check_unique(values: list[str]) -> list[str]:
    for index, value in enumerate(values):
        if value in values[:index]:
            raise PydanticCustomError("duplicate_item", f"{value!r} is listed twice")
    return values


def _one_or_many(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise PydanticCustomError("keys_type", "expected an attribute key or a list of them")
    return value


Name = Annotated[
    StrictStr,
    AfterValidator(_check_name),
    WithJsonSchema({"type": "string", "pattern": f"^{NAME_PATTERN.pattern}$"}),
]
Regex = Annotated[StrictStr, AfterValidator(_check_regex)]
Cron = Annotated[StrictStr, AfterValidator(_check_cron)]
TimeZone = Annotated[StrictStr, AfterValidator(_check_tz)]

Duration = Annotated[
    StrictStr,
    BeforeValidator(_not_a_bare_number),
    AfterValidator(_check_duration),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^\s*(?=\d)(\d+d)?(\d+h)?(\d+m(?!s))?(\d+s)?(\d+ms)?\s*$",
            "description": "a duration: 250ms, 30s, 10m, 1h30m, 7d",
        }
    ),
]

# One attribute key or several; the short form `by: a` means `by: [a]`.
AttributeKeys = Annotated[
    list[Annotated[StrictStr, Field(min_length=1)]],
    BeforeValidator(_one_or_many),
    Field(min_length=1),
    AfterValidator(_check_unique),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1,
                    "uniqueItems": True,
                },
            ],
            "description": "an attribute key, or a list of them",
        }
    ),
]
