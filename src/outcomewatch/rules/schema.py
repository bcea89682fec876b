"""Pydantic models of a rule file, exactly as written in YAML. Validation only, no compilation.

Every model forbids unknown keys, and scalars are strict: YAML already gives typed values, and
silently turning ``1`` into ``"1"`` would change what an equality condition means. Durations and
regexes stay strings here (so ``RuleFileModel.model_json_schema()`` describes the file as written);
they are checked here and compiled by :mod:`outcomewatch.rules.load`.

The value types (durations, regexes, cron expressions, ...) and their validators live in
:mod:`outcomewatch.rules.values`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import (
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
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import PydanticCustomError
from pydantic_core.core_schema import TaggedUnionSchema

from outcomewatch.durations import parse_duration
from outcomewatch.model import Severity, SpanStatus
from outcomewatch.rules.values import (
    BOOL,
    FLOAT,
    INT,
    OPERATORS_TAG,
    STR,
    AttributeKeys,
    Cron,
    Duration,
    Name,
    Number,
    Regex,
    Scalar,
    TimeZone,
    condition_tag,
)

# An error raised by a model validator is located at the model; the key named in its context
# under AT is where it belongs (the loader appends it to the error's loc).
AT = "at"

CORRELATE_NEEDS_WITHIN = (
    "a rule with 'correlate' must give 'within' (how long to wait for outcomes from other traces)"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionModel(_Strict):
    """A mapping of operators on one attribute; every operator given must hold.

    ``regex`` is matched with ``re.fullmatch`` (the whole value, not a substring).
    """

    in_: list[Scalar] | None = Field(default=None, alias="in", min_length=1)
    not_in: list[Scalar] | None = Field(default=None, min_length=1)
    regex: Regex | None = None
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
    Annotated[StrictBool, Tag(BOOL)]
    | Annotated[StrictInt, Tag(INT)]
    | Annotated[StrictFloat, Tag(FLOAT)]
    | Annotated[StrictStr, Tag(STR)]
    | Annotated[ConditionModel, Tag(OPERATORS_TAG)],
    Discriminator(
        condition_tag,
        custom_error_type="condition_type",
        custom_error_message=(
            "expected a value to test for equality (string, number or bool) "
            "or a mapping of operators"
        ),
    ),
]


class _Bounds(_Strict):
    """A mapping of bounds: each given one needs a value, and at least one must be given."""

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise PydanticCustomError("null_bound", "a bound needs a value, not null")
        return value

    @model_validator(mode="after")
    def _at_least_one(self) -> Self:
        if not self.model_fields_set:
            keys = ", ".join(_keys_of(type(self)))
            raise PydanticCustomError(
                "empty_bounds", f"needs at least one bound (expected one of: {keys})"
            )
        return self


class CountModel(_Bounds):
    """How many matching spans an expectation needs; both bounds inclusive."""

    gte: Annotated[StrictInt, Field(ge=0)] | None = Field(default=None, description="at least")
    lte: Annotated[StrictInt, Field(ge=0)] | None = Field(default=None, description="at most")

    @model_validator(mode="after")
    def _ordered(self) -> CountModel:
        if self.gte is not None and self.lte is not None and self.gte > self.lte:
            raise PydanticCustomError(
                "empty_count", f"gte ({self.gte}) is greater than lte ({self.lte}): no count fits"
            )
        return self


class DurationBoundsModel(_Bounds):
    """Bounds on a span's duration; every bound given must hold."""

    lt: Duration | None = Field(default=None, description="shorter than")
    lte: Duration | None = Field(default=None, description="at most")
    gt: Duration | None = Field(default=None, description="longer than")
    gte: Duration | None = Field(default=None, description="at least")

    @model_validator(mode="after")
    def _satisfiable(self) -> DurationBoundsModel:
        # (limit, inclusive); the tightest lower and upper bound decide.
        lower = [(parse_duration(v), k == "gte") for k, v in self._given(("gt", "gte"))]
        upper = [(parse_duration(v), k == "lte") for k, v in self._given(("lt", "lte"))]
        if lower and upper:
            low, low_inclusive = max(lower, key=lambda b: (b[0], not b[1]))
            high, high_inclusive = min(upper, key=lambda b: (b[0], b[1]))
            if low > high or (low == high and not (low_inclusive and high_inclusive)):
                raise PydanticCustomError("empty_duration", "no duration satisfies these bounds")
        return self

    def _given(self, keys: tuple[str, ...]) -> list[tuple[str, str]]:
        return [(k, v) for k in keys if (v := getattr(self, k)) is not None]


class ScheduleModel(_Strict):
    """When the trigger is due: a 5-field cron expression, read in the time zone ``tz``."""

    cron: Cron = Field(
        description="minute hour day-of-month month day-of-week, like '0 3 * * *'"
    )
    tz: TimeZone = Field(
        default="UTC", description="IANA time zone the cron expression is read in"
    )
    grace: Duration = Field(
        default="5m", description="how late the trigger may start before the run fails"
    )


class CorrelateModel(_Strict):
    """Outcomes may come from other traces whose spans carry the trigger's values of ``by``."""

    by: AttributeKeys = Field(description="attribute key(s) shared by the trigger and outcomes")


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


SELECTOR_KEYS = _keys_of(SelectorModel)
EXPECT_ONLY = tuple(k for k in _keys_of(ExpectModel) if k not in SELECTOR_KEYS)


class RuleModel(_Strict):
    """One rule: a trigger opens a run, which passes when every expectation is met."""

    model_config = ConfigDict(json_schema_extra={"dependentRequired": {"correlate": ["within"]}})

    name: Name = Field(
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
    open_after: StrictInt = Field(
        default=1, ge=1, description="consecutive failed runs before an incident opens"
    )
    resolve_after: StrictInt | None = Field(
        default=None, ge=1,
        description="consecutive passed runs that resolve the open incident (default: by hand)",
    )
    reopen_within: Duration | None = Field(
        default=None,
        description="a failure this soon after a resolve re-opens that incident (default 24h)",
    )

    @model_validator(mode="after")
    def _correlate_needs_within(self) -> RuleModel:
        if self.correlate is not None and self.within is None:
            raise PydanticCustomError(
                "correlate_without_within", CORRELATE_NEEDS_WITHIN, {AT: "correlate"}
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
