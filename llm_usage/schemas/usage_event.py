"""The usage event v1 (`llm_usage_recorded`): every rule of docs/contract.md ("Usage event v1"),
checked in one model.

A valid event can always be stored. Besides the contract's rules the model refuses what
PostgreSQL cannot hold: NUL characters and lone surrogates in text, integers beyond `bigint`,
decimals with a scale it cannot keep, and times outside the calendar once in UTC or on its very
first or last instant (which asyncpg writes as -infinity / infinity). Every text field is at
most 200 characters: the attribution ids are index keys (the deployment index, budget scopes),
and a b-tree entry over 2704 bytes cannot be inserted.

Most rules are pydantic-core constraints; Python runs only for what core cannot say: exact
decimals (a binary float never reaches money), UTC conversion with the future check, and the
rules that relate two fields. `null` is accepted where the contract says "or null", and for
`customer_charge_cents`; a null `customer_charge_usd` is refused, never read as absent.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from types import UnionType
from typing import Annotated, Any, Final, Literal, NamedTuple, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetPydanticSchema,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from llm_usage.domain.ids import ID_JSON_PATTERN, has_control_character
from llm_usage.domain.money import cents_to_usd, usd_to_cents

EVENT_TYPE: Final = "llm_usage_recorded"
SCHEMA_VERSION: Final = 1
MAX_TEXT_LENGTH = 200
BIGINT_MAX = 2**63 - 1
MAX_WHOLE_DIGITS = 12
MAX_FRACTION_DIGITS = 18
MAX_FUTURE_SKEW = timedelta(minutes=5)
MAX_CENTS_DISAGREEMENT = 1
# asyncpg writes the very first and last instants of Python's calendar as PostgreSQL -infinity
# and infinity: an event at either would be stored as a time it did not happen at.
FIRST_STORABLE_INSTANT = datetime.min.replace(tzinfo=UTC) + timedelta(microseconds=1)
LAST_STORABLE_INSTANT = datetime.max.replace(tzinfo=UTC) - timedelta(microseconds=1)

# PostgreSQL text cannot hold U+0000. The same check makes pydantic-core read the string as
# UTF-8, which refuses lone surrogates (`"\ud800"` in JSON) with `string_unicode`.
NO_NUL_PATTERN = r"^[^\x00]*$"
# RFC 3339 `date-time` (section 5.6, including the space its note allows); the offset is
# mandatory, so a naive time, a date alone or a Unix number in a string never matches.
RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
# A decimal in a string is written the way JSON writes a number: no spaces, `_`, `+`, NaN or
# Infinity, all of which Python's `Decimal()` would otherwise accept.
DECIMAL_TEXT_PATTERN = r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$"
_DECIMAL_TEXT = re.compile(DECIMAL_TEXT_PATTERN.removeprefix("^").removesuffix("$"))
# The usual case, "0.0054": digits within both limits and no sign, so no counting is needed.
_PLAIN_DECIMAL_TEXT = re.compile(r"(0|[1-9][0-9]{0,11})(\.[0-9]{1,18})?")

CONFLICT_FIELDS: tuple[str, ...] = (
    "tenant_id",
    "deployment_id",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "total_tokens",
    "customer_charge_usd",
    "occurred_at",
)


class MissingNowError(TypeError):
    """Validation was called without `context={"now": <aware datetime>}`.

    A `TypeError`, so pydantic lets it through: it is a bug in the caller, and turning it into a
    validation error would dead-letter every event instead of stopping the consumer.
    """


# In order: a bool is also an int.
_JSON_KINDS: tuple[tuple[type[Any] | UnionType, str], ...] = (
    (bool, "a boolean"),
    (float, "a binary float"),
    (int | Decimal, "a number"),
    (str, "a string"),
    (Mapping, "an object"),
    (list | tuple, "an array"),
)


def json_kind(value: object) -> str:
    """How a JSON reader would name the type of `value`, for error messages."""
    if value is None:
        return "null"
    for kinds, name in _JSON_KINDS:
        if isinstance(value, kinds):
            return name
    return f"a {type(value).__name__}"


def exact_decimal(value: object) -> Decimal:
    """`value` as an exact, finite Decimal ≥ 0 within 12 digits before the point and 18 after.

    Accepts a Decimal, an int, or a string written like a JSON number. Digits are counted as
    written, so `"1.0000000000000000000"` (19 after the point) is refused like any other: that
    is the scale PostgreSQL would be asked to keep. Negative zero becomes zero.
    """
    if isinstance(value, str):
        if _PLAIN_DECIMAL_TEXT.fullmatch(value) is not None:
            return Decimal(value)
        if _DECIMAL_TEXT.fullmatch(value) is None:
            raise PydanticCustomError(
                "decimal_text", 'must be a number written in digits, like "0.0054"'
            )
        number = Decimal(value)
    elif isinstance(value, Decimal):
        number = value
    elif isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(value)
    else:
        raise PydanticCustomError(
            "decimal_exact_type",
            'must be a decimal string like "0.0054" or a JSON number, not {kind}',
            {"kind": json_kind(value)},
        )
    sign, digits, exponent = number.as_tuple()
    if not isinstance(exponent, int):  # 'n', 'N' or 'F': NaN, sNaN or Infinity
        raise PydanticCustomError("finite_number", "must be a finite number")
    if -exponent > MAX_FRACTION_DIGITS:
        raise PydanticCustomError(
            "decimal_max_places",
            "at most {places} digits after the decimal point",
            {"places": MAX_FRACTION_DIGITS},
        )
    if len(digits) + exponent > MAX_WHOLE_DIGITS:
        raise PydanticCustomError(
            "decimal_whole_digits",
            "at most {digits} digits before the decimal point",
            {"digits": MAX_WHOLE_DIGITS},
        )
    if sign:
        if any(digits):
            raise PydanticCustomError("greater_than_equal", "must be at least 0", {"ge": 0})
        number = number.copy_abs()
    return number


def _occurred_at_schema(
    _source: Any, _handler: Callable[[Any], core_schema.CoreSchema]
) -> core_schema.CoreSchema:
    parse = core_schema.chain_schema(
        [
            core_schema.str_schema(strict=True, pattern=RFC3339_PATTERN),
            # Lax only in the sense of "parse this string": the pattern above already decided.
            core_schema.datetime_schema(strict=False, tz_constraint="aware"),
        ]
    )
    return core_schema.custom_error_schema(
        parse,
        custom_error_type="rfc3339_datetime",
        custom_error_message=(
            "must be an RFC 3339 date-time with an offset, "
            "like 2026-11-14T09:00:00Z or 2026-11-14T14:30:00+05:30"
        ),
    )


def _schema_version_schema(
    _source: Any, _handler: Callable[[Any], core_schema.CoreSchema]
) -> core_schema.CoreSchema:
    # Not `Literal[1]`: pydantic's literal check takes `true`, `1.0` and `Decimal(1)` for 1.
    return core_schema.custom_error_schema(
        core_schema.int_schema(strict=True, ge=SCHEMA_VERSION, le=SCHEMA_VERSION),
        custom_error_type="schema_version",
        custom_error_message=f"must be {SCHEMA_VERSION}, the only version this pipeline reads",
    )


Id = Annotated[
    str,
    Field(
        strict=True,
        min_length=1,
        max_length=MAX_TEXT_LENGTH,
        pattern=NO_NUL_PATTERN,
        json_schema_extra={"pattern": ID_JSON_PATTERN},
    ),
]
Text = Annotated[str, Field(strict=True, max_length=MAX_TEXT_LENGTH, pattern=NO_NUL_PATTERN)]
Count = Annotated[int, Field(strict=True, ge=0, le=BIGINT_MAX)]
ExactUsd = Annotated[
    Decimal,
    # Before, not Plain: pydantic 2.14 then keeps its own Decimal serializer (a PlainValidator's
    # wrap serializer warns on every JSON dump). What reaches core is already a checked Decimal.
    BeforeValidator(exact_decimal),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": DECIMAL_TEXT_PATTERN},
                {"type": "number", "minimum": 0},
            ],
        }
    ),
]
OccurredAt = Annotated[
    datetime,
    GetPydanticSchema(_occurred_at_schema),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": RFC3339_PATTERN}),
]
SchemaVersion = Annotated[
    Literal[1],
    GetPydanticSchema(_schema_version_schema),
    WithJsonSchema({"type": "integer", "const": SCHEMA_VERSION}),
]
# Open: a mode the gateway adds later is stored as sent, never a reason to refuse usage. Known
# today: flat_percent, fixed_per_token, plan_inclusive.
MarkupMode = Text


def _without_default(schema: dict[str, Any]) -> None:
    """For fields whose value is derived when absent: the schema must not claim a constant."""
    schema.pop("default", None)


def _publisher_view_of_json_schema(schema: dict[str, Any]) -> None:
    """The schema is read by gateway authors: describe the event, and the rule between charges."""
    schema["description"] = (
        "One llm_usage_recorded event per billable LLM request. Unknown fields are ignored. "
        "Decimals are exact (a string is preferred), at most 12 digits before the point and 18 "
        "after. With both customer_charge_usd and customer_charge_cents, "
        "|round_half_up(customer_charge_usd x 100) - customer_charge_cents| <= 1. With "
        "neither, the pipeline prices the event from its price table (provider and model "
        "required; charge_estimated) or dead-letters it as unpriced."
    )


def clean_id(value: str) -> str:
    """The contract's id rule beyond length: no surrounding whitespace, no control characters."""
    if value != value.strip():
        raise PydanticCustomError(
            "id_whitespace", "must not begin or end with whitespace (the contract's id rule)"
        )
    if has_control_character(value):
        raise PydanticCustomError(
            "id_control_character",
            "must not contain control characters (U+0000-U+001F, U+007F-U+009F)",
        )
    return value


def in_utc_and_not_in_the_future(value: datetime, info: ValidationInfo) -> datetime:
    """`occurred_at` in UTC, storable, and at most 5 minutes after the context's `now`."""
    now = _now_from(info.context)
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not FIRST_STORABLE_INSTANT <= utc <= LAST_STORABLE_INSTANT:
        raise PydanticCustomError(
            "datetime_out_of_range",
            "must be after 0001-01-01T00:00:00Z and before 9999-12-31T23:59:59.999999Z "
            "once converted to UTC",
        )
    if utc - now > MAX_FUTURE_SKEW:
        raise PydanticCustomError(
            "datetime_in_future",
            "is more than 5 minutes after now ({now})",
            {"now": now.astimezone(UTC).isoformat()},
        )
    return utc


class UsageEvent(BaseModel):
    """One billable LLM request as the gateway published it, validated and normalised.

    Validate with `UsageEvent.model_validate(data, context={"now": now})`: `now` (aware) bounds
    `occurred_at`. After validation `customer_charge_usd` is always the exact charge (cents / 100
    when only cents were sent), `total_tokens` is always set and `occurred_at` is in UTC.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        strict=True,
        use_attribute_docstrings=True,
        title="Usage event v1 (llm_usage_recorded)",
        json_schema_extra=_publisher_view_of_json_schema,
    )

    event_type: Literal["llm_usage_recorded"] = EVENT_TYPE
    """Optional; when present it must be `llm_usage_recorded`."""
    schema_version: SchemaVersion = SCHEMA_VERSION
    """Optional, default 1; any other value is rejected."""
    gateway_request_id: Id
    """The idempotency key: a repeat of a stored id is a duplicate, never a second charge."""
    tenant_id: Id
    deployment_id: Text | None = None
    """The invoice line groups by it; null is its own group. At most 200 characters."""
    user_id: Text | None = None
    agent_id: Text | None = None
    channel: Text | None = None
    feature: Text | None = None
    provider: Text | None = None
    model: Text | None = None
    request_kind: Text | None = None
    input_tokens: Count = 0
    output_tokens: Count = 0
    cached_input_tokens: Count = 0
    reasoning_tokens: Count = 0
    total_tokens: Count = Field(default=0, json_schema_extra=_without_default)
    """Default input_tokens + output_tokens."""
    upstream_cost_usd: ExactUsd | None = None
    """What the provider charged the gateway: an exact decimal ≥ 0."""
    # Not sent reads as None (the price table may price the event: `usage_row` says so); null
    # is refused, since an explicit null exact charge is more likely a serialiser's mistake
    # than a request to price. After validation it is None only when no charge was sent.
    customer_charge_usd: ExactUsd = Field(default=None, json_schema_extra=_without_default)  # type: ignore[assignment]
    """The exact charge to bill, a decimal ≥ 0 (a string is preferred); cents / 100 when absent.
    With neither, the price table prices the event from its provider and model."""
    # Unlike the exact charge, null reads as "not sent": it is only a display value, and null is
    # how most serialisers (this model's own `model_dump`) write an absent optional number.
    customer_charge_cents: Count | None = None
    """The gateway's own rounding, for display; within 1 cent of customer_charge_usd."""
    markup_mode: MarkupMode | None = None
    """How the gateway priced the charge: any text of at most 200 characters (known:
    flat_percent, fixed_per_token, plan_inclusive)."""
    occurred_at: OccurredAt
    """RFC 3339 with an offset, stored as UTC; at most 5 minutes after now."""

    _clean_id = field_validator("gateway_request_id", "tenant_id")(clean_id)
    _in_utc_and_not_in_the_future = field_validator("occurred_at")(in_utc_and_not_in_the_future)

    @model_validator(mode="after")
    def _derive_totals_and_check_charges(self) -> Self:
        provided = self.model_fields_set
        if "total_tokens" not in provided:
            total = self.input_tokens + self.output_tokens
            if total > BIGINT_MAX:
                raise PydanticCustomError(
                    "total_tokens_overflow",
                    "total_tokens: input_tokens + output_tokens exceeds {max}; send total_tokens",
                    {"max": BIGINT_MAX},
                )
            self._set_derived("total_tokens", total)
        cents = self.customer_charge_cents
        if "customer_charge_usd" in provided:
            if cents is not None:
                require_agreement(self.customer_charge_usd, cents)
        elif cents is not None:
            usd = cents_to_usd(cents)
            if usd.adjusted() >= MAX_WHOLE_DIGITS:
                raise PydanticCustomError(
                    "cents_too_large",
                    "customer_charge_cents: without customer_charge_usd, the charge in USD "
                    "is limited to {digits} digits before the decimal point",
                    {"digits": MAX_WHOLE_DIGITS},
                )
            self._set_derived("customer_charge_usd", usd)
        return self

    def _set_derived(self, name: str, value: object) -> None:
        # The model is frozen for everyone else; this runs inside validation, before anyone
        # holds the instance.
        self.__dict__[name] = value


class UsageRow(NamedTuple):
    """A valid event as the pipeline keeps it: its stored values, in the table's column order.

    What both decoders hand the consumers: one tuple an event, which `COPY` takes as it is, with
    the names of `UsageEvent`'s fields. The fixed `event_type` and `schema_version` are not kept.
    """

    gateway_request_id: str
    tenant_id: str
    deployment_id: str | None
    user_id: str | None
    agent_id: str | None
    channel: str | None
    feature: str | None
    provider: str | None
    model: str | None
    request_kind: str | None
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    total_tokens: int
    upstream_cost_usd: Decimal | None
    customer_charge_usd: Decimal
    customer_charge_cents: int | None
    markup_mode: str | None
    occurred_at: datetime
    # Whether the price table computed the charge (the gateway sent none), and the
    # `effective_from` of the row of the event's provider and model that priced it.
    charge_estimated: bool = False
    price_effective_from: datetime | None = None


class UnpricedEvent(NamedTuple):
    """A valid event that sent no charge: the price table must price it before it is stored or
    counted. `row.customer_charge_usd` is a placeholder 0 until then."""

    row: UsageRow


# The fields the event itself gives, in the row's order; the pricing ones come after them.
EVENT_FIELD_COUNT = 20
_ROW_VALUES = operator.itemgetter(*UsageRow._fields[:EVENT_FIELD_COUNT])
_GATEWAY_PRICED = (False, None)


def usage_row(event: UsageEvent) -> UsageRow | UnpricedEvent:
    """The stored values of a validated `event`; an `UnpricedEvent` when it sent no charge."""
    values = _ROW_VALUES(event.__dict__)
    if event.customer_charge_usd is None:
        placeholder = (*values[:16], Decimal(0), *values[17:], True, None)
        return UnpricedEvent(UsageRow._make(placeholder))
    return UsageRow._make(values + _GATEWAY_PRICED)


def _now_from(context: object) -> datetime:
    # `dict` first: the check against the `Mapping` ABC is slow, and context is a dict.
    now = context.get("now") if isinstance(context, dict | Mapping) else None
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise MissingNowError(
            "UsageEvent.model_validate(data, context={'now': <timezone-aware datetime>}) is "
            "required: occurred_at may be at most 5 minutes after now"
        )
    return now


def require_agreement(usd: Decimal, cents: int) -> None:
    rounded = usd_to_cents(usd)
    if abs(rounded - cents) > MAX_CENTS_DISAGREEMENT:
        raise PydanticCustomError(
            "charge_disagreement",
            "customer_charge_cents ({cents}) disagrees with customer_charge_usd ({usd}, "
            "{rounded} cents rounded half up) by more than 1 cent",
            {"cents": cents, "usd": str(usd), "rounded": rounded},
        )


def _comparable(name: str, value: object) -> object:
    """`value` in a form where equal means "the same fact", whatever way it was written."""
    if name == "customer_charge_usd" and isinstance(value, str | int):
        try:
            return Decimal(value)
        except InvalidOperation:
            return value
    if name == "occurred_at" and isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return value
    return value


def conflicting_fields(stored: Mapping[str, object], incoming: Mapping[str, object]) -> list[str]:
    """The `CONFLICT_FIELDS` whose values differ between what is stored and what came in.

    Re-serialising does not make a conflict: decimals compare by value (`0.50` is `0.5`, whether
    a string or a number) and times as instants (`10:00+01:00` is `09:00Z`). A missing key
    reads as null.
    """
    return [
        name
        for name in CONFLICT_FIELDS
        if _comparable(name, stored.get(name)) != _comparable(name, incoming.get(name))
    ]
