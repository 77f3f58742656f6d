"""Budgets as the contract defines them: scopes, windows, periods, levels, thresholds, alert ids.

Pure values and functions, no I/O: the budget consumer, the policy commands and the reports all
take their periods, thresholds and alert ids from here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_DOWN, Context, Decimal, DivisionByZero, InvalidOperation, Overflow
from enum import StrEnum
from typing import Any, Final, TypeAlias

from llm_usage.domain.money import EXACT_CONTEXT, MONEY_PRECISION, canonical_decimal, round_half_up
from llm_usage.domain.periods import add_months, month_end, month_start, utc_day


class ScopeType(StrEnum):
    TENANT = "tenant"
    DEPLOYMENT = "deployment"
    USER = "user"
    AGENT = "agent"


class BudgetWindow(StrEnum):
    DAILY = "daily"
    MONTHLY = "monthly"


class Enforcement(StrEnum):
    """What a policy's limits do: only `alert`, or also `block` the budget checks that would
    pass them."""

    ALERT = "alert"
    BLOCK = "block"


class AlertLevel(StrEnum):
    """In the order they are reached (and emitted, when one event crosses both)."""

    WARNING = "warning"
    EXCEEDED = "exceeded"


# Every scope an event counts toward, and the event field that names it: its tenant always, each
# attribution when it is not null. Both fast paths of the budget consumer are built from this
# table: the SQL that expands a batch into counters and the Python walk that finds which event
# crossed a level; an integration property holds the two equal.
SCOPE_FIELDS: Final[tuple[tuple[ScopeType, str], ...]] = (
    (ScopeType.TENANT, "tenant_id"),
    (ScopeType.DEPLOYMENT, "deployment_id"),
    (ScopeType.USER, "user_id"),
    (ScopeType.AGENT, "agent_id"),
)


def scopes_of(event: object) -> list[tuple[ScopeType, str]]:
    """Every (scope type, scope id) an event counts toward, from `SCOPE_FIELDS`: the rule the
    fast paths are tested against."""
    return [
        (scope_type, value)
        for scope_type, field in SCOPE_FIELDS
        if (value := getattr(event, field)) is not None
    ]


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
    day = utc_day(moment)
    return day if window is BudgetWindow.DAILY else month_start(day)


def period_end(window: BudgetWindow, start: date) -> date:
    """The last day of the period that begins on `start`."""
    return start if window is BudgetWindow.DAILY else month_end(start)


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


class BudgetLevel(StrEnum):
    """Where a spend stands against a limit, as `budget status` and the API report it."""

    OK = "ok"
    WARNING = "warning"
    EXCEEDED = "exceeded"


def budget_level(spend_usd: Decimal, limit_usd: Decimal, warn_threshold_pct: int) -> BudgetLevel:
    """`exceeded` when spend ≥ limit, `warning` when spend ≥ limit * pct / 100, else `ok`;
    exact comparisons, so a spend equal to a threshold has reached it."""
    if spend_usd >= threshold_usd(AlertLevel.EXCEEDED, limit_usd, warn_threshold_pct):
        return BudgetLevel.EXCEEDED
    if spend_usd >= threshold_usd(AlertLevel.WARNING, limit_usd, warn_threshold_pct):
        return BudgetLevel.WARNING
    return BudgetLevel.OK


_TRAPS: Final = [InvalidOperation, DivisionByZero, Overflow]


def percent_of_limit(spend_usd: Decimal, limit_usd: Decimal) -> Decimal:
    """spend / limit * 100, rounded half up to 2 places (`Decimal("33.33")`), exactly.

    The quotient may not terminate (1/3). It is truncated, not rounded, at a precision that
    keeps at least 4 digits after the point; a truncated value is at or above a half-way point
    (x.xx5) exactly when the true quotient is, so the one rounding half up is the right one.
    """
    if limit_usd <= 0:
        raise ValueError(f"a limit is more than 0, not {limit_usd}")
    whole_digits = max(spend_usd.adjusted() - limit_usd.adjusted() + 3, 0) + 1
    spend_digits = len(spend_usd.as_tuple().digits)
    truncating = Context(
        prec=max(MONEY_PRECISION, whole_digits + 4, spend_digits + 3),
        rounding=ROUND_DOWN,
        traps=_TRAPS,
    )
    quotient = truncating.divide(truncating.multiply(spend_usd, Decimal(100)), limit_usd)
    return round_half_up(quotient, 2)


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """One policy window in its current period: spend, limit, percent and level, and what open
    holds of budget checks keep back in it. The level is a function of spend alone: alerts are
    about spend, not holds."""

    scope_type: ScopeType
    scope_id: str
    window: BudgetWindow
    period_start: date
    spend_usd: Decimal
    limit_usd: Decimal
    warn_threshold_pct: int
    percent: Decimal
    level: BudgetLevel
    held_usd: Decimal = Decimal(0)
    enforcement: Enforcement = Enforcement.ALERT

    def to_json(self) -> dict[str, Any]:
        """The contract's fields; amounts and percent as exact decimal strings."""
        return {
            "scope_type": self.scope_type.value,
            "scope_id": self.scope_id,
            "window": self.window.value,
            "period_start": self.period_start.isoformat(),
            "spend_usd": canonical_decimal(self.spend_usd),
            "limit_usd": canonical_decimal(self.limit_usd),
            "percent": format(self.percent, "f"),
            "level": self.level.value,
            "held_usd": canonical_decimal(self.held_usd),
            "enforcement": self.enforcement.value,
        }


def budget_status(
    *,
    scope_type: ScopeType,
    scope_id: str,
    window: BudgetWindow,
    period_start: date,
    spend_usd: Decimal,
    limit_usd: Decimal,
    warn_threshold_pct: int,
    held_usd: Decimal = Decimal(0),
    enforcement: Enforcement = Enforcement.ALERT,
) -> BudgetStatus:
    """Where `spend_usd` stands against `limit_usd` for one policy window and period."""
    return BudgetStatus(
        scope_type=scope_type,
        scope_id=scope_id,
        window=window,
        period_start=period_start,
        spend_usd=spend_usd,
        limit_usd=limit_usd,
        warn_threshold_pct=warn_threshold_pct,
        percent=percent_of_limit(spend_usd, limit_usd),
        level=budget_level(spend_usd, limit_usd, warn_threshold_pct),
        held_usd=held_usd,
        enforcement=enforcement,
    )


def budget_horizon(now: datetime) -> date:
    """The first day of the oldest budget period still evaluated: the previous UTC month's.
    An event of an earlier day counts in no period, and those periods' counters and published
    alerts are pruned (storage/budget_pruning.py): by then each ended at least 28 days ago."""
    return add_months(month_start(utc_day(now)), -1)
