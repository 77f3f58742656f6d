"""Budgets as the contract defines them: scopes, windows, periods, levels, and the alert v1.

Pure values and functions, no I/O: the budget consumer, the policy commands and the reports all
take their periods, thresholds and alert ids from here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator

from llm_usage.schemas.money import EXACT_CONTEXT


class ScopeType(StrEnum):
    TENANT = "tenant"
    DEPLOYMENT = "deployment"
    USER = "user"
    AGENT = "agent"


class BudgetWindow(StrEnum):
    DAILY = "daily"
    MONTHLY = "monthly"


class AlertLevel(StrEnum):
    """In the order they are reached (and emitted, when one event crosses both)."""

    WARNING = "warning"
    EXCEEDED = "exceeded"


# A counter as plain values, (tenant_id, scope_type, scope_id, window, period_start): a batch
# touches thousands of counters, and a tuple of str hashes and sorts in C. Its natural order is
# the lock order, the same as `CounterKey.sort_key`.
SpendKey: TypeAlias = tuple[str, str, str, str, date]


@dataclass(frozen=True, order=True)
class CounterKey:
    """One spend counter. Ordered, so that every replica locks counter rows in the same order
    (two replicas updating the same counters can then never deadlock)."""

    tenant_id: str
    scope_type: ScopeType
    scope_id: str
    window: BudgetWindow
    period_start: date

    def sort_key(self) -> tuple[str, str, str, str, date]:
        """The lock order as a plain tuple: sorting thousands of keys by it is three times
        faster than through the dataclass's own comparisons."""
        return (
            self.tenant_id,
            self.scope_type.value,
            self.scope_id,
            self.window.value,
            self.period_start,
        )

    @classmethod
    def from_spend_key(cls, key: SpendKey) -> CounterKey:
        tenant_id, scope_type, scope_id, window, start = key
        return cls(tenant_id, ScopeType(scope_type), scope_id, BudgetWindow(window), start)

    def alert_id(self, level: AlertLevel, limit_usd: Decimal) -> str:
        """The id of this counter's alert of `level` against `limit_usd`."""
        return alert_id_for(
            tenant_id=self.tenant_id,
            scope_type=self.scope_type,
            scope_id=self.scope_id,
            window=self.window,
            period_start=self.period_start,
            level=level,
            limit_usd=limit_usd,
        )

    @property
    def scope(self) -> tuple[str, str, str]:
        """The (tenant_id, scope_type, scope_id) a policy is keyed on."""
        return (self.tenant_id, self.scope_type.value, self.scope_id)


def period_start(window: BudgetWindow, moment: datetime) -> date:
    """The first day of the UTC day or UTC calendar month that `moment` falls in."""
    if moment.tzinfo is None:
        raise ValueError("a budget period needs an aware datetime; naive times are ambiguous")
    utc = moment.astimezone(UTC).date()
    return utc if window is BudgetWindow.DAILY else utc.replace(day=1)


def canonical_decimal(value: Decimal) -> str:
    """The one spelling of an exact amount: plain digits, no exponent, no trailing zeros
    (`100.00` and `1E+2` are both `100`), so equal limits give equal alert ids and JSON."""
    normalized = value.normalize(EXACT_CONTEXT)
    text = format(normalized, "f")
    return "0" if normalized.is_zero() else text


def threshold_usd(level: AlertLevel, limit_usd: Decimal, warn_threshold_pct: int) -> Decimal:
    """The spend at which `level` is reached: limit * pct / 100 for a warning, the limit itself
    for exceeded. Exact (a percentage of an exact decimal is exact)."""
    if level is AlertLevel.EXCEEDED:
        return limit_usd
    return EXACT_CONTEXT.divide(EXACT_CONTEXT.multiply(limit_usd, Decimal(warn_threshold_pct)), 100)


def alert_threshold_pct(level: AlertLevel, warn_threshold_pct: int) -> int:
    """`threshold_pct` on the alert: the policy's warn percentage, or 100 for exceeded."""
    return warn_threshold_pct if level is AlertLevel.WARNING else 100


def alert_id_for(
    *,
    tenant_id: str,
    scope_type: ScopeType,
    scope_id: str,
    window: BudgetWindow,
    period_start: date,
    level: AlertLevel,
    limit_usd: Decimal,
) -> str:
    """The alert key as one stable id: the same key gives the same id on every replica, forever.

    A SHA-256 over the key's parts, each length-prefixed so that no two keys can collide by
    shifting characters between parts.
    """
    parts = (
        tenant_id,
        scope_type.value,
        scope_id,
        window.value,
        period_start.isoformat(),
        level.value,
        canonical_decimal(limit_usd),
    )
    material = "".join(f"{len(part)}:{part};" for part in parts)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


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
    """Budget alert v1 on `llm_budget_alerts` (see CONTRACT.md): amounts are exact decimal
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
