"""The API's answers as pydantic models: what `/openapi.json` documents and what is sent.

Money is an exact decimal string (never a JSON number), counts are integers, times RFC 3339 in
UTC with `Z`, days `YYYY-MM-DD`. An answer validates from the values storage returns (their
attributes), so a route never spells out the fields it sends.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from llm_usage.domain.money import canonical_decimal

MONEY_PATTERN = r"^[0-9]+(\.[0-9]+)?$"


def _exact_usd(value: object) -> object:
    return canonical_decimal(value) if isinstance(value, Decimal) else value


def _plain_decimal(value: object) -> object:
    return format(value, "f") if isinstance(value, Decimal) else value


def _iso_day(value: object) -> object:
    return value.isoformat() if isinstance(value, date) else value


# Text in the answer, from the exact values storage returns.
UsdText = Annotated[str, BeforeValidator(_exact_usd)]
DecimalText = Annotated[str, BeforeValidator(_plain_decimal)]
DayText = Annotated[str, BeforeValidator(_iso_day)]


def Money(description: str = "exact USD as a decimal string") -> Any:  # noqa: N802 - a field type
    return Field(description=description, pattern=MONEY_PATTERN, examples=["12.0054"])


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", from_attributes=True)


class _UsageFigures(_Answer):
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    total_tokens: int
    customer_charge_usd: UsdText = Money()
    estimated_charge_usd: UsdText = Money(
        "the part of customer_charge_usd the price table estimated (the gateway sent no charge)"
    )


class UsageTodayAnswer(_UsageFigures):
    from_: str = Field(alias="from", description="today's UTC midnight, RFC 3339; included")
    to: str = Field(description="now, RFC 3339, UTC; excluded")

    model_config = ConfigDict(populate_by_name=True)


class UsageSummaryAnswer(_UsageFigures):
    tenant_id: str
    from_: str = Field(alias="from", description="RFC 3339, UTC; included")
    to: str = Field(description="RFC 3339, UTC; excluded")
    today: UsageTodayAnswer = Field(description="the same figures for today (UTC) up to now")

    model_config = ConfigDict(populate_by_name=True)


class BreakdownItemAnswer(_UsageFigures):
    key: str | None = Field(description="the attribute's value; null for events without one")


class UsageBreakdownAnswer(_Answer):
    by: Literal["deployment", "model", "provider", "user", "agent", "channel", "feature"]
    from_: str = Field(alias="from", description="RFC 3339, UTC; included")
    to: str = Field(description="RFC 3339, UTC; excluded")
    items: list[BreakdownItemAnswer] = Field(description="highest charge first")

    model_config = ConfigDict(populate_by_name=True)


class DailyItemAnswer(_Answer):
    date: DayText = Field(validation_alias="day", description="the UTC day, YYYY-MM-DD")
    requests: int
    customer_charge_usd: UsdText = Money()
    estimated_charge_usd: UsdText = Money(
        "the part of customer_charge_usd the price table estimated (the gateway sent no charge)"
    )


class UsageDailyAnswer(_Answer):
    items: list[DailyItemAnswer] = Field(description="oldest first, today last, every day")


class BudgetAnswer(_Answer):
    scope_type: Literal["tenant", "deployment", "user", "agent"]
    scope_id: str
    window: Literal["daily", "monthly"]
    period_start: DayText = Field(description="the first day of the current UTC day or month")
    spend_usd: UsdText = Money()
    limit_usd: UsdText = Money()
    percent: DecimalText = Field(description="spend / limit * 100, rounded half up to 2 places")
    level: Literal["ok", "warning", "exceeded"] = Field(description="from spend alone")
    held_usd: UsdText = Money("what open holds of budget checks keep back in this period")
    enforcement: Literal["alert", "block"] = Field(
        description="`block`: budget checks that would pass the limit are denied"
    )


class BudgetsAnswer(_Answer):
    items: list[BudgetAnswer]


class AlertsAnswer(_Answer):
    items: list[dict[str, Any]] = Field(
        description="budget alerts v1, each exactly as on the alerts topic, newest first"
    )


class PolicyAnswer(_Answer):
    tenant_id: str
    scope_type: Literal["tenant", "deployment", "user", "agent"]
    scope_id: str
    daily_limit_usd: UsdText | None = Money("exact USD, or null: no daily limit")
    monthly_limit_usd: UsdText | None = Money("exact USD, or null: no monthly limit")
    warn_threshold_pct: int
    enforcement: Literal["alert", "block"] = Field(
        description="`alert`: the limits only alert; `block`: budget checks are also denied"
    )


class PoliciesAnswer(_Answer):
    items: list[PolicyAnswer]


class PolicyChangeAnswer(_Answer):
    result: Literal["created", "replaced", "unchanged", "deleted"] = Field(
        description="`unchanged`: equal to the current policy, nothing audited"
    )
    policy: PolicyAnswer | None = Field(description="the scope's policy now (null once deleted)")
    previous: PolicyAnswer | None = Field(description="the policy before (null: there was none)")


class PolicyBody(BaseModel):
    """The body of `PUT …/budget-policies`: the scope's whole new policy."""

    model_config = ConfigDict(extra="forbid")

    scope_type: Literal["tenant", "deployment", "user", "agent"]
    scope_id: str | None = Field(
        default=None, description="required unless scope_type is tenant (then the tenant id)"
    )
    daily_limit_usd: str | None = Field(
        default=None, description="exact USD > 0 as a string (`100`, `12.50`); null: no limit"
    )
    monthly_limit_usd: str | None = Field(
        default=None, description="exact USD > 0 as a string (`100`, `12.50`); null: no limit"
    )
    warn_threshold_pct: int = Field(default=80, ge=1, le=99)
    enforcement: Literal["alert", "block"] = Field(
        default="alert",
        description="`block`: also deny budget checks (POST /v1/budget-checks) that would pass "
        "a limit; `alert`: only alert",
    )


class InvoiceLineAnswer(_Answer):
    tenant_id: str
    period: str
    deployment_id: str | None
    kind: Literal["llm_usage", "llm_usage_adjustment", "llm_usage_plan_true_up"]
    resource_kind: str
    unit: str
    unit_price_cents: int | None
    qty: int
    amount_cents: int
    description: str
    meta: dict[str, Any]
    closed: bool


class InvoiceLinesAnswer(_Answer):
    period: str
    closed: bool = Field(description="true: the month is closed and these lines are final")
    items: list[InvoiceLineAnswer]


class IngestResult(_Answer):
    gateway_request_id: str | None = Field(description="null when the event did not name one")
    status: Literal["accepted", "rejected"]
    reason: Literal["invalid_json", "schema_violation", "too_large"] | None = Field(
        description="why it was rejected, as the dead-letter topic would say"
    )
    detail: str | None


class IngestAnswer(_Answer):
    results: list[IngestResult] = Field(description="one per event, in the order sent")


class ErrorAnswer(BaseModel):
    detail: str
