"""A tenant's budgets in their current periods: policies joined to the spend counters.

Spend comes from `budget_spend`, the counters the budget consumer keeps, and what open holds
keep back from `budget_held` (placed - ended, per counter); events are never summed here. One
query for the whole tenant, whatever the number of policies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from llm_usage.domain.budgets import (
    BudgetStatus,
    BudgetWindow,
    CounterKey,
    Enforcement,
    ScopeType,
    budget_status,
    period_start,
)
from llm_usage.storage.pool import Connection

# Each policy once per window it has a limit for, with that window's current period; the
# counter of exactly that period, or 0 when nothing has been counted in it yet; the same for what
# is held on it. Read without locks: a snapshot for people and alerts, never a decision.
_SELECT_STATUS = """
    SELECT p.tenant_id, p.scope_type, p.scope_id, w."window", w.period_start, w.limit_usd,
           p.warn_threshold_pct, p.enforcement, coalesce(s.spend_usd, 0) AS spend_usd,
           coalesce(h.placed_usd - h.ended_usd, 0) AS held_usd
    FROM budget_policies AS p
    CROSS JOIN LATERAL (
        VALUES ('daily', $2::date, p.daily_limit_usd),
               ('monthly', $3::date, p.monthly_limit_usd)
    ) AS w ("window", period_start, limit_usd)
    LEFT JOIN budget_spend AS s
        ON s.tenant_id = p.tenant_id
        AND s.scope_type = p.scope_type
        AND s.scope_id = p.scope_id
        AND s."window" = w."window"
        AND s.period_start = w.period_start
    LEFT JOIN budget_held AS h
        ON h.tenant_id = p.tenant_id
        AND h.scope_type = p.scope_type
        AND h.scope_id = p.scope_id
        AND h."window" = w."window"
        AND h.period_start = w.period_start
    WHERE ($1::text IS NULL OR p.tenant_id = $1) AND w.limit_usd IS NOT NULL
    ORDER BY p.tenant_id,
             array_position(ARRAY['tenant', 'deployment', 'user', 'agent'], p.scope_type),
             p.scope_id,
             w."window"
"""


@dataclass(frozen=True)
class PolicyWindow:
    """One window of a policy in its current period, with the spend counted in it and what open
    holds keep back."""

    counter: CounterKey
    limit_usd: Decimal
    warn_threshold_pct: int
    spend_usd: Decimal
    held_usd: Decimal = Decimal(0)
    enforcement: Enforcement = Enforcement.ALERT


async def current_policy_windows(
    connection: Connection, *, now: datetime, tenant_id: str | None = None
) -> list[PolicyWindow]:
    """Every policy window (of one tenant, or all) in the UTC day or month that `now` (aware)
    falls in, with its counter's spend: scopes in the order tenant, deployment, user, agent,
    then by id; daily before monthly. One query; events are never summed."""
    rows = await connection.fetch(
        _SELECT_STATUS,
        tenant_id,
        period_start(BudgetWindow.DAILY, now),
        period_start(BudgetWindow.MONTHLY, now),
    )
    return [
        PolicyWindow(
            counter=CounterKey(
                row["tenant_id"],
                ScopeType(row["scope_type"]),
                row["scope_id"],
                BudgetWindow(row["window"]),
                row["period_start"],
            ),
            limit_usd=row["limit_usd"],
            warn_threshold_pct=row["warn_threshold_pct"],
            spend_usd=row["spend_usd"],
            held_usd=row["held_usd"],
            enforcement=Enforcement(row["enforcement"]),
        )
        for row in rows
    ]


async def tenant_budget_status(
    connection: Connection, tenant_id: str, *, now: datetime
) -> list[BudgetStatus]:
    """The tenant's budgets as `budget status` and the portals show them."""
    return [
        budget_status(
            scope_type=window.counter.scope_type,
            scope_id=window.counter.scope_id,
            window=window.counter.window,
            period_start=window.counter.period_start,
            spend_usd=window.spend_usd,
            limit_usd=window.limit_usd,
            warn_threshold_pct=window.warn_threshold_pct,
            held_usd=window.held_usd,
            enforcement=window.enforcement,
        )
        for window in await current_policy_windows(connection, now=now, tenant_id=tenant_id)
    ]
