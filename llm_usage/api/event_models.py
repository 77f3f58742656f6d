"""The answers of the events drill-down and of the policy history (beside `api/models.py`, whose
conventions they follow: money an exact decimal string, times RFC 3339 in UTC with `Z`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from llm_usage.api.models import Money, UsdText, _Answer
from llm_usage.api.params import rfc3339


def _utc_text(value: object) -> object:
    return rfc3339(value) if isinstance(value, datetime) else value


TimeText = Annotated[str, BeforeValidator(_utc_text)]


class StoredEventAnswer(_Answer):
    """A stored usage event, every column, as the gateway sent it (corrections never change it)."""

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
    upstream_cost_usd: UsdText | None = Money("exact USD the provider charged, or null")
    customer_charge_usd: UsdText = Money("the exact charge billed")
    customer_charge_cents: int | None = Field(description="the gateway's own rounding, or null")
    markup_mode: str | None
    occurred_at: TimeText = Field(description="RFC 3339, UTC")
    received_at: TimeText = Field(description="RFC 3339, UTC: when the pipeline stored it")
    charge_estimated: bool = Field(
        description="true: the gateway sent no charge and the price table estimated it"
    )
    price_effective_from: TimeText | None = Field(
        description="RFC 3339, UTC: the `effective_from` of the price row (of the event's "
        "provider and model) that estimated the charge; null when the gateway charged"
    )


class EffectiveAnswer(_Answer):
    """What an event contributes now: its stored values with the winning correction applied."""

    deployment_id: str | None
    user_id: str | None
    agent_id: str | None
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    total_tokens: int
    customer_charge_usd: UsdText = Money("the exact charge it counts for now")
    customer_charge_cents: int | None
    charge_estimated: bool = Field(description="true: the charge is the price table's estimate")
    voided: bool = Field(description="true: voided, it counts for nothing (figures as before)")


class UsageEventAnswer(StoredEventAnswer):
    """A stored usage event, every column, and its effective values."""

    effective: EffectiveAnswer
    corrected: bool = Field(description="true: a correction applies (`effective` is not as sent)")


class UsageEventsAnswer(_Answer):
    items: list[UsageEventAnswer] = Field(
        description="newest first: by occurred_at, then gateway_request_id, both descending"
    )
    next_cursor: str | None = Field(
        description="pass as `cursor` (with the same filters) for the next, older page; "
        "null: this is the last page"
    )


class PolicyAuditAnswer(_Answer):
    changed_at: TimeText = Field(description="RFC 3339, UTC")
    actor: str = Field(description="the token's `sub` (or the CLI's actor) that made the change")
    tenant_id: str
    scope_type: Literal["tenant", "deployment", "user", "agent"]
    scope_id: str
    old_policy: dict[str, Any] | None = Field(
        description="the policy before, as audited; null: none"
    )
    new_policy: dict[str, Any] | None = Field(description="the policy after; null: deleted")


class PolicyHistoryAnswer(_Answer):
    items: list[PolicyAuditAnswer] = Field(description="newest first")
