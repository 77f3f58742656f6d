"""The budget consumer's own tables: the ids it has counted and the spend counters.

Every write takes rows in sorted order, so two replicas touching the same ids or counters lock
them in the same order and cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from llm_usage.schemas.budget import BudgetWindow, CounterKey, ScopeType
from llm_usage.schemas.money import EXACT_CONTEXT
from llm_usage.storage.pool import Connection

_RECORD_COUNTED = """
    INSERT INTO budget_counted_events (gateway_request_id)
    SELECT id FROM unnest($1::text[]) WITH ORDINALITY AS u(id, n) ORDER BY n
    ON CONFLICT (gateway_request_id) DO NOTHING
    RETURNING gateway_request_id
"""

# The addition and the value after it come from one statement per row under the row's lock, so
# `before = after - increment` is exact even while another replica adds to the same counter.
_ADD_TO_COUNTERS = """
    INSERT INTO budget_spend (tenant_id, scope_type, scope_id, "window", period_start, spend_usd)
    SELECT tenant_id, scope_type, scope_id, "window", period_start, spend_usd
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::date[], $6::numeric[])
        WITH ORDINALITY AS u(tenant_id, scope_type, scope_id, "window", period_start, spend_usd, n)
    ORDER BY n
    ON CONFLICT (tenant_id, scope_type, scope_id, "window", period_start)
        DO UPDATE SET spend_usd = budget_spend.spend_usd + EXCLUDED.spend_usd
    RETURNING tenant_id, scope_type, scope_id, "window", period_start, spend_usd
"""

_PRUNE_COUNTED = """
    DELETE FROM budget_counted_events
    WHERE gateway_request_id IN (
        SELECT gateway_request_id FROM budget_counted_events
        WHERE counted_at < now() - make_interval(hours => $1)
        LIMIT $2
    )
"""

# Each policy with the spend of its current day and month (0 where nothing was counted yet).
_CURRENT_SPEND_AGAINST_POLICIES = """
    SELECT p.tenant_id, p.scope_type, p.scope_id, p.daily_limit_usd, p.monthly_limit_usd,
           p.warn_threshold_pct,
           coalesce(d.spend_usd, 0) AS daily_spend_usd,
           coalesce(m.spend_usd, 0) AS monthly_spend_usd
    FROM budget_policies p
    LEFT JOIN budget_spend d
        ON d.tenant_id = p.tenant_id AND d.scope_type = p.scope_type
       AND d.scope_id = p.scope_id AND d."window" = 'daily' AND d.period_start = $1
    LEFT JOIN budget_spend m
        ON m.tenant_id = p.tenant_id AND m.scope_type = p.scope_type
       AND m.scope_id = p.scope_id AND m."window" = 'monthly' AND m.period_start = $2
    WHERE $3::text IS NULL OR p.tenant_id = $3
    ORDER BY p.tenant_id, p.scope_type, p.scope_id
"""


async def record_counted_ids(
    connection: Connection, gateway_request_ids: Sequence[str]
) -> set[str]:
    """Remember these ids as counted; return those that were not counted before."""
    rows = await connection.fetch(_RECORD_COUNTED, sorted(set(gateway_request_ids)))
    return {row["gateway_request_id"] for row in rows}


async def add_to_counters(
    connection: Connection, increments: Mapping[CounterKey, Decimal]
) -> dict[CounterKey, Decimal]:
    """Add each increment to its counter (creating it at 0); return each counter's value before."""
    keys = sorted(increments)
    rows = await connection.fetch(
        _ADD_TO_COUNTERS,
        [k.tenant_id for k in keys],
        [k.scope_type.value for k in keys],
        [k.scope_id for k in keys],
        [k.window.value for k in keys],
        [k.period_start for k in keys],
        [increments[k] for k in keys],
    )
    before: dict[CounterKey, Decimal] = {}
    for row in rows:
        key = CounterKey(
            row["tenant_id"],
            ScopeType(row["scope_type"]),
            row["scope_id"],
            BudgetWindow(row["window"]),
            row["period_start"],
        )
        before[key] = EXACT_CONTEXT.subtract(row["spend_usd"], increments[key])
    return before


async def prune_counted_ids(connection: Connection, *, older_than_hours: int, limit: int) -> int:
    """Forget up to `limit` counted ids older than the retention; return how many."""
    status = await connection.execute(_PRUNE_COUNTED, older_than_hours, limit)
    return int(status.rsplit(" ", 1)[-1])


@dataclass(frozen=True)
class PolicySpend:
    """A policy and what its scope spent in the current day and month."""

    tenant_id: str
    scope_type: ScopeType
    scope_id: str
    daily_limit_usd: Decimal | None
    monthly_limit_usd: Decimal | None
    warn_threshold_pct: int
    daily_spend_usd: Decimal
    monthly_spend_usd: Decimal

    def limit_and_spend(self, window: BudgetWindow) -> tuple[Decimal | None, Decimal]:
        if window is BudgetWindow.DAILY:
            return self.daily_limit_usd, self.daily_spend_usd
        return self.monthly_limit_usd, self.monthly_spend_usd


async def current_spend_against_policies(
    connection: Connection, *, today: date, tenant_id: str | None = None
) -> list[PolicySpend]:
    """Every policy (of one tenant, or all) with its scope's spend today and this month, read
    from the counters: one query, never a sum over events."""
    rows = await connection.fetch(
        _CURRENT_SPEND_AGAINST_POLICIES, today, today.replace(day=1), tenant_id
    )
    return [
        PolicySpend(
            tenant_id=row["tenant_id"],
            scope_type=ScopeType(row["scope_type"]),
            scope_id=row["scope_id"],
            daily_limit_usd=row["daily_limit_usd"],
            monthly_limit_usd=row["monthly_limit_usd"],
            warn_threshold_pct=row["warn_threshold_pct"],
            daily_spend_usd=row["daily_spend_usd"],
            monthly_spend_usd=row["monthly_spend_usd"],
        )
        for row in rows
    ]
