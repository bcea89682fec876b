"""Pydantic models of a rule file, exactly as written in YAML. Validation only, no compilation.

Every model forbids unknown keys, and scalars are strict: YAML already gives typed values, and
silently turning ``1`` into ``"1"`` would change what an equality condition means. Durations and
regexes stay strings here (so ``RuleFileModel.model_json_schema()`` describes the file as written);
they are checked here and compiled by :mod:`outcomewatch.rules.load`.

Unions are discriminated by Python type with tags that start with ``~``. Pydantic puts a tag into
an error's ``loc``; ``TAGS`` lets the loader drop them so a location reads like the YAML path.
"""

from __future__ import annotations

import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from outcomewatch.durations import parse_duration
from outcomewatch.errors import DurationError
from outcomewatch.model import Severity, SpanStatus

NAME_PATTERN = re.compile(r"[a-z0-9._-]+")

_BOOL, _INT, _FLOAT, _STR, _OPERATORS = "~bool", "~int", "~float", "~str", "~operators"
TAGS = frozenset({_BOOL, _INT, _FLOAT, _STR, _OPERATORS})


def _scalar_tag(value: Any) -> str | None:
    # bool before int: in Python, True is an int, and here it must not be one.
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, int):
        return _INT
    if isinstance(value, float):
        return _FLOAT
    if isinstance(value, str):
        return _STR
    return None


def _number_tag(value: Any) -> str | None:
    tag = _scalar_tag(value)
    return tag if tag in (_INT, _FLOAT) else None


def _condition_tag(value: Any) -> str | None:
    return _OPERATORS if isinstance(value, dict) else _scalar_tag(value)


Scalar = Annotated[
    Annotated[StrictBool, Tag(_BOOL)]
    | Annotated[StrictInt, Tag(_INT)]
    | Annotated[StrictFloat, Tag(_FLOAT)]
    | Annotated[StrictStr, Tag(_STR)],
    Discriminator(
        _scalar_tag,
        custom_error_type="scalar_type",
        custom_error_message="expected a string, number or bool",
    ),
]

Number = Annotated[
    Annotated[StrictInt, Tag(_INT)] | Annotated[StrictFloat, Tag(_FLOAT)],
    Discriminator(
        _number_tag,
        custom_error_type="number_type",
        custom_error_message="expected a number (int or float, not bool)",
    ),
]


def _check_name(value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        # Messages are formatted here, without a context: pydantic would otherwise expand any
        # "{...}" inside the user's value as a template field.
        raise PydanticCustomError(
            "rule_name",
            f"invalid rule name {value!r}: use only lowercase letters, digits, '.', '_' and '-'",
        )
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
    except re.error as exc:
        raise PydanticCustomError("regex", f"invalid regex {value!r}: {exc}") from exc
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionModel(_Strict):
    """A mapping of operators on one attribute; every operator given must hold.

    ``regex`` is matched with ``re.fullmatch`` (the whole value, not a substring).
    """

    in_: list[Scalar] | None = Field(default=None, alias="in", min_length=1)
    not_in: list[Scalar] | None = Field(default=None, min_length=1)
    regex: Annotated[StrictStr, AfterValidator(_check_regex)] | None = None
    exists: StrictBool | None = None
    ne: Scalar | None = None
    gt: Number | None = None
    gte: Number | None = None
    lt: Number | None = None
    lte: Number | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # `ne: null` could mean "present" or "not given"; refuse to guess.
        if value is None:
            raise PydanticCustomError("null_operator", "an operator needs a value, not null")
        return value

    @model_validator(mode="after")
    def _at_least_one_operator(self) -> ConditionModel:
        if not self.model_fields_set:
            raise PydanticCustomError(
                "empty_condition",
                "a condition mapping needs at least one operator "
                f"(expected one of: {', '.join(OPERATORS)})",
            )
        return self


def _keys_of(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(field.alias or name for name, field in model.model_fields.items())


OPERATORS = _keys_of(ConditionModel)

# A scalar is an equality test; a mapping holds operators.
WhereValue = Annotated[
    Annotated[StrictBool, Tag(_BOOL)]
    | Annotated[StrictInt, Tag(_INT)]
    | Annotated[StrictFloat, Tag(_FLOAT)]
    | Annotated[StrictStr, Tag(_STR)]
    | Annotated[ConditionModel, Tag(_OPERATORS)],
    Discriminator(
        _condition_tag,
        custom_error_type="condition_type",
        custom_error_message=(
            "expected a value to test for equality (string, number or bool) "
            "or a mapping of operators"
        ),
    ),
]


class SelectorModel(_Strict):
    """Which spans a trigger or a forbidden outcome matches; every key given must hold.

    ``span`` and ``service`` are fnmatch globs (``*``, ``?``, ``[...]``), case-sensitive.
    """

    span: StrictStr = Field(min_length=1, description="span name (glob)")
    service: StrictStr | None = Field(
        default=None, min_length=1, description="service.name resource attribute (glob)"
    )
    status: SpanStatus | None = Field(default=None, description="span status")
    where: dict[Annotated[StrictStr, Field(min_length=1)], WhereValue] = Field(
        default_factory=dict,
        description="attribute key -> value (equality) or a mapping of operators",
    )
    duration: DurationBoundsModel | None = Field(
        default=None, description="bounds on the span's duration (end - start)"
    )


class ExpectModel(SelectorModel):
    """An expected outcome: a selector, plus how many matches it needs and when they count."""

    count: CountModel | None = Field(
        default=None, description="how many matching spans are needed (default: at least one)"
    )
    after: Literal["trigger"] | None = Field(
        default=None, description="'trigger': only spans that start after the trigger started"
    )


EXPECT_ONLY = tuple(k for k in _keys_of(ExpectModel) if k not in _keys_of(SelectorModel))


class RuleModel(_Strict):
    name: Annotated[StrictStr, AfterValidator(_check_name)] = Field(
        description="unique rule name: lowercase letters, digits, '.', '_' and '-'"
    )
    description: StrictStr = ""
    owner: StrictStr = ""
    route: StrictStr = ""
    severity: Severity = Severity.WARNING
    trigger: SelectorModel = Field(description="the span that opens a run of this rule")
    expect: list[ExpectModel] = Field(
        min_length=1, description="outcomes that must all be observed for the run to pass"
    )
    forbid: list[SelectorModel] = Field(
        default_factory=list,
        min_length=1,
        description="spans that fail the run as soon as one is seen in the trace",
    )
    within: Duration | None = Field(
        default=None, description="deadline for the expected outcomes, from the trigger's start"
    )
    max_duration: Duration | None = Field(
        default=None, description="longest allowed time from trigger start to the last outcome"
    )
    correlate: CorrelateModel | None = Field(
        default=None, description="also accept outcomes from other traces (needs 'within')"
    )
    group_by: AttributeKeys | None = Field(
        default=None, description="attributes of the trigger: one open incident per value set"
    )
    schedule: ScheduleModel | None = Field(
        default=None, description="when the trigger must happen; a missed start is a failure"
    )
    evidence: list[StrictStr] = Field(
        default_factory=list, description="attributes copied into an incident as evidence"
    )

    @model_validator(mode="after")
    def _correlate_needs_within(self) -> RuleModel:
        if self.correlate is not None and self.within is None:
            raise PydanticCustomError(
                "correlate_without_within",
                "a rule with 'correlate' must give 'within' "
                "(how long to wait for outcomes from other traces)",
                {AT: "correlate"},
            )
        return self


class RuleFileModel(_Strict):
    """The whole file: a mapping with one key, ``rules``."""

    model_config = ConfigDict(title="outcomewatch rule file")

    rules: list[RuleModel]


class _FileSchema(GenerateJsonSchema):
    def tagged_union_schema(self, schema: TaggedUnionSchema) -> JsonSchemaValue:
        # Members are told apart by Python type; in JSON Schema an integer is also a "number",
        # so "oneOf" would refuse every integer. "anyOf" says the same thing without that trap.
        generated = super().tagged_union_schema(schema)
        if "oneOf" in generated:
            generated["anyOf"] = generated.pop("oneOf")
        return generated


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a rule file, for editors (YAML language servers) and CI validators."""
    generated = RuleFileModel.model_json_schema(schema_generator=_FileSchema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **generated}


def keys_at(loc: tuple[str | int, ...]) -> tuple[str, ...]:
    """The keys allowed in the mapping at ``loc`` (a pydantic loc without tags) of a rule file.

    Found by walking the models' annotations, so it follows the schema; () if ``loc`` does not
    lead to a model.
    """
    annotation: Any = RuleFileModel
    for element in loc:
        annotation = _annotation_child(annotation, element)
        if annotation is None:
            return ()
    for candidate in _members(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return _keys_of(candidate)
    return ()


def _members(annotation: Any) -> list[Any]:
    """``annotation`` with Annotated and unions unwrapped into their member types."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def _annotation_child(annotation: Any, element: str | int) -> Any:
    for candidate in _members(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            for name, field in candidate.model_fields.items():
                if element in (name, field.alias):
                    return field.annotation
        origin = get_origin(candidate)
        if origin is list and isinstance(element, int):
            return get_args(candidate)[0]
        if origin is dict:
            return get_args(candidate)[1]
    return None
