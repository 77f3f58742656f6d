"""Budget alert v1, the record on the alerts topic (docs/contract.md): exact amounts as decimal
strings, `period_start` a date, `emitted_at` RFC 3339 UTC with milliseconds."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator

from llm_usage.domain.budgets import AlertLevel, BudgetWindow, ScopeType
from llm_usage.domain.money import canonical_decimal


def _utc_rfc3339(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


ExactAmount = Annotated[
    Decimal,
    Field(ge=0),
    PlainSerializer(canonical_decimal, return_type=str, when_used="always"),
    Field(json_schema_extra={"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}),
]
UtcTime = Annotated[
    datetime,
    PlainSerializer(_utc_rfc3339, return_type=str, when_used="always"),
]


class BudgetAlert(BaseModel):
    """Budget alert v1 on `llm_budget_alerts` (docs/contract.md): amounts are exact decimal
    strings, `period_start` a date, `emitted_at` RFC 3339 UTC with milliseconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: Literal["llm_budget_alert"] = "llm_budget_alert"
    schema_version: Literal[1] = 1
    alert_id: str = Field(
        min_length=1,
        description="Stable id derived from tenant, scope, window, period_start, level and limit.",
    )
    tenant_id: str = Field(min_length=1)
    scope_type: ScopeType
    scope_id: str = Field(min_length=1)
    window: BudgetWindow
    period_start: date
    level: AlertLevel
    spend_usd: ExactAmount = Field(description="Spend at the moment of crossing, exact.")
    limit_usd: ExactAmount
    threshold_pct: int = Field(ge=1, le=100)
    triggered_by: str | None = Field(
        description="gateway_request_id of the event that crossed it; null for a policy change."
    )
    emitted_at: UtcTime

    @field_validator("spend_usd", "limit_usd", mode="before")
    @classmethod
    def _no_floats(cls, value: object) -> object:
        if isinstance(value, float):
            raise ValueError("amounts are exact decimals (a string), never a binary float")
        return value

    @field_validator("emitted_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("emitted_at needs a time zone; a naive time is ambiguous")
        return value

    def encode(self) -> bytes:
        """The record value: compact JSON, fields in the contract's order."""
        return self.model_dump_json().encode()
