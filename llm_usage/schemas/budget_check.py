"""The body of `POST /v1/budget-checks`: who asks, for which request, and how much it may cost.

Ids and attributions follow the usage event's rules (the same validators), so a check names the
counters its event will count toward. The estimate comes in exactly one of two forms: an exact
`estimated_charge_usd`, or the tokens the request may use (`provider`, `model`,
`estimated_input_tokens`, `estimated_output_tokens`, and optionally the cached and reasoning
parts), which the API prices from the price table. Numbers are read from their literal digits,
never through a binary float; unknown fields are ignored, as for events.
"""

from __future__ import annotations

from typing import Final, Self

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llm_usage.schemas.dead_letter import Rejection
from llm_usage.schemas.decoding import parse_exact_json
from llm_usage.schemas.usage_event import Count, ExactUsd, Id, Text, clean_id, json_kind

MAX_CHECK_BYTES: Final = 16 * 1024
TOKEN_FIELDS: Final = (
    "estimated_input_tokens",
    "estimated_output_tokens",
    "estimated_cached_input_tokens",
    "estimated_reasoning_tokens",
)
_REQUIRED_WITH_TOKENS: Final = ("provider", "model", *TOKEN_FIELDS[:2])


class MalformedCheckError(ValueError):
    """The body is not a JSON object; the message says why."""


class BudgetCheckRequest(BaseModel):
    """A gateway's question before an LLM request: may it spend about this much?"""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        strict=True,
        use_attribute_docstrings=True,
        title="Budget check",
    )

    gateway_request_id: Id
    """The request's id: its usage event must carry the same one (that settles the hold), and a
    repeated check with it answers the first answer."""
    tenant_id: Id
    deployment_id: Text | None = None
    user_id: Text | None = None
    agent_id: Text | None = None
    estimated_charge_usd: ExactUsd | None = None
    """The estimate itself: an exact decimal ≥ 0 (a string is preferred). Or send tokens."""
    provider: Text | None = None
    model: Text | None = None
    estimated_input_tokens: Count | None = None
    estimated_output_tokens: Count | None = None
    estimated_cached_input_tokens: Count | None = None
    """Part of estimated_input_tokens; default 0."""
    estimated_reasoning_tokens: Count | None = None
    """Part of estimated_output_tokens; default 0."""

    _clean_id = field_validator("gateway_request_id", "tenant_id")(clean_id)

    @model_validator(mode="after")
    def _one_estimate(self) -> Self:
        tokens_sent = [name for name in TOKEN_FIELDS if getattr(self, name) is not None]
        if self.estimated_charge_usd is not None and tokens_sent:
            raise PydanticCustomError(
                "budget_check_two_estimates",
                "send estimated_charge_usd or estimated tokens, not both (got "
                "estimated_charge_usd and {tokens})",
                {"tokens": ", ".join(tokens_sent)},
            )
        if self.estimated_charge_usd is not None:
            return self
        missing = [name for name in _REQUIRED_WITH_TOKENS if getattr(self, name) is None]
        if len(missing) == len(_REQUIRED_WITH_TOKENS):
            raise PydanticCustomError(
                "budget_check_no_estimate",
                "send estimated_charge_usd, or provider, model, estimated_input_tokens and "
                "estimated_output_tokens",
            )
        if missing:
            raise PydanticCustomError(
                "budget_check_tokens_incomplete",
                "an estimate in tokens needs {missing} too (or send estimated_charge_usd)",
                {"missing": ", ".join(missing)},
            )
        if self.cached_input_tokens > self.input_tokens:
            raise PydanticCustomError(
                "budget_check_cached_tokens",
                "estimated_cached_input_tokens is part of estimated_input_tokens: at most it",
            )
        if self.reasoning_tokens > self.output_tokens:
            raise PydanticCustomError(
                "budget_check_reasoning_tokens",
                "estimated_reasoning_tokens is part of estimated_output_tokens: at most it",
            )
        return self

    # The tokens form's counts, once validated (0 for what was not sent).
    @property
    def input_tokens(self) -> int:
        return self.estimated_input_tokens or 0

    @property
    def output_tokens(self) -> int:
        return self.estimated_output_tokens or 0

    @property
    def cached_input_tokens(self) -> int:
        return self.estimated_cached_input_tokens or 0

    @property
    def reasoning_tokens(self) -> int:
        return self.estimated_reasoning_tokens or 0


def parse_budget_check(body: bytes) -> BudgetCheckRequest:
    """The check in `body`: MalformedCheckError when it is not one JSON object, pydantic's
    ValidationError when a field breaks a rule."""
    data = parse_exact_json(body)
    if isinstance(data, Rejection):
        raise MalformedCheckError(data.detail)
    if not isinstance(data, dict):
        raise MalformedCheckError(f"the JSON value is {json_kind(data)}; a check is an object")
    return BudgetCheckRequest.model_validate(data)
