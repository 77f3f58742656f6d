"""The price table's answers and the body of `PUT /v1/prices` (beside `api/models.py`, whose
conventions they follow: money an exact decimal string, times RFC 3339 in UTC with `Z`)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from llm_usage.api.event_models import TimeText
from llm_usage.api.models import Money, UsdText, _Answer
from llm_usage.schemas.usage_event import DECIMAL_TEXT_PATTERN, Id, OccurredAt, exact_decimal


class PriceAnswer(_Answer):
    provider: str
    model: str
    effective_from: TimeText = Field(description="RFC 3339, UTC: in effect from then on")
    input: UsdText = Money("exact USD per million input tokens")
    cached_input: UsdText = Money("exact USD per million cached input tokens")
    output: UsdText = Money("exact USD per million output tokens")
    reasoning: UsdText = Money("exact USD per million reasoning tokens")
    request_fee_usd: UsdText = Money("exact USD per request")


class PricesAnswer(_Answer):
    items: list[PriceAnswer] = Field(
        description="by provider, model, then effective_from ascending"
    )


class PricesAddedAnswer(_Answer):
    added: list[PriceAnswer] = Field(description="the rows added, as given")
    unchanged: list[PriceAnswer] = Field(
        description="rows already in the table exactly as given: nothing was added for them"
    )


def _decimal_string(value: object) -> Decimal:
    if not isinstance(value, str):
        raise PydanticCustomError("decimal_string", 'must be a decimal string like "2.50"')
    return exact_decimal(value)


PriceUsd = Annotated[
    Decimal,
    BeforeValidator(_decimal_string),
    WithJsonSchema({"type": "string", "pattern": DECIMAL_TEXT_PATTERN}),
]


class PriceBody(BaseModel):
    """One row of `PUT /v1/prices`: USD per million tokens as exact decimal strings."""

    model_config = ConfigDict(extra="forbid")

    provider: Id
    model: Id
    effective_from: OccurredAt | None = Field(
        default=None,
        description="RFC 3339 with an offset; a pair's first row may start at any time, a "
        "change at least 10 minutes from now. Absent (in every row of the body): the earliest "
        "allowed, now for a new pair and 10 minutes from now for a change",
    )
    input: PriceUsd
    output: PriceUsd
    cached_input: PriceUsd | None = Field(default=None, description="default: the input price")
    reasoning: PriceUsd | None = Field(default=None, description="default: the output price")
    request_fee_usd: PriceUsd | None = Field(default=None, description="USD per request [0]")
