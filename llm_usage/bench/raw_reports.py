"""The usage reports as the release before the per-dimension aggregates read them, kept so that
`bench api` measures them beside today's in the same run: the summary and every breakdown but
the deployment's from raw events (index-only scans of migration 0005's covering index), the
deployment breakdown and the daily series from `usage_daily_totals`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import asyncpg

# The event column of each breakdown dimension, from this fixed table only (never from input).
COLUMNS: Final = {
    "deployment": "deployment_id",
    "model": "model",
    "provider": "provider",
    "user": "user_id",
    "agent": "agent_id",
    "channel": "channel",
    "feature": "feature",
}
_SUMMARY = """
    SELECT count(*), coalesce(sum(input_tokens), 0)::bigint,
           coalesce(sum(output_tokens), 0)::bigint,
           coalesce(sum(cached_input_tokens), 0)::bigint,
           coalesce(sum(reasoning_tokens), 0)::bigint, coalesce(sum(total_tokens), 0)::bigint,
           coalesce(sum(customer_charge_usd), 0)
    FROM llm_usage_events
    WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3
"""
_ORDER_AND_LIMIT = """
    ORDER BY customer_charge_usd DESC, requests DESC, key ASC NULLS FIRST
    LIMIT $4
"""
_BREAKDOWN_EVENTS = """
    SELECT {column} AS key, count(*) AS requests, sum(input_tokens)::bigint AS input_tokens,
           sum(output_tokens)::bigint AS output_tokens,
           sum(customer_charge_usd) AS customer_charge_usd
    FROM llm_usage_events
    WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3
    GROUP BY {column}
"""
_BREAKDOWN_DEPLOYMENTS = """
    SELECT deployment_id AS key, sum(requests)::bigint AS requests,
           sum(input_tokens)::bigint AS input_tokens,
           sum(output_tokens)::bigint AS output_tokens, sum(charge_usd) AS customer_charge_usd
    FROM usage_daily_totals
    WHERE tenant_id = $1 AND day >= $2 AND day < $3
    GROUP BY deployment_id
"""
_DAILY = """
    SELECT day, sum(requests)::bigint, sum(charge_usd)
    FROM usage_daily_totals
    WHERE tenant_id = $1 AND day >= $2 AND day < $3
    GROUP BY day
"""


async def raw_report(
    connection: asyncpg.Connection,
    route: str,
    tenant_id: str,
    *,
    start: datetime,
    end: datetime,
    dimension: str = "model",
) -> int:
    """Run the old report `route` (summary, breakdown by `dimension`, daily) over the UTC days
    [start, end); the number of rows it answered."""
    if route == "summary":
        await connection.fetchrow(_SUMMARY, tenant_id, start, end)
        return 1
    first_day, end_day = start.astimezone(UTC).date(), end.astimezone(UTC).date()
    if route == "daily":
        return len(await connection.fetch(_DAILY, tenant_id, first_day, end_day))
    if dimension == "deployment":
        query = _BREAKDOWN_DEPLOYMENTS + _ORDER_AND_LIMIT
        return len(await connection.fetch(query, tenant_id, first_day, end_day, 10))
    query = _BREAKDOWN_EVENTS.format(column=COLUMNS[dimension]) + _ORDER_AND_LIMIT
    return len(await connection.fetch(query, tenant_id, start, end, 10))
