"""Reads behind `prices drift` and `prices preview`: a month's events, checked against the price
table or summed for pricing under today's table. Read only; call inside a transaction (the
drift check reads through a server-side cursor, which needs one).

Both read one month: `occurred_at` bounds prune the partitioned events table to that month's
partition. The preview's sums need only columns the Tier 1 index carries (migration 0009); the
drift check also needs `upstream_cost_usd`, which it does not, so it reads the rows themselves,
once, streaming.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

from llm_usage.domain.price_drift import DEFAULT_TOLERANCE, DriftTally, PairDrift, check_event
from llm_usage.domain.price_preview import PairUsage
from llm_usage.domain.prices import in_effect
from llm_usage.storage.pool import Connection
from llm_usage.storage.prices import load_prices

# Rows fetched per round trip of the cursor.
CURSOR_PREFETCH = 5000


class UpstreamCostRow(NamedTuple):
    provider: str | None
    model: str | None
    occurred_at: datetime
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    upstream_cost_usd: Decimal


_UPSTREAM_COSTS = """
    SELECT provider, model, occurred_at, input_tokens, output_tokens, cached_input_tokens,
           reasoning_tokens, upstream_cost_usd
    FROM llm_usage_events
    WHERE occurred_at >= $1 AND occurred_at < $2 AND upstream_cost_usd IS NOT NULL {tenant}
"""
# Two statements rather than "$3 IS NULL OR tenant_id = $3": with a tenant, the index's range
# on (tenant_id, occurred_at) is the plan.
_UPSTREAM_COSTS_ALL = _UPSTREAM_COSTS.format(tenant="")
_UPSTREAM_COSTS_OF_TENANT = _UPSTREAM_COSTS.format(tenant="AND tenant_id = $3")


async def events_with_upstream_cost(
    connection: Connection, *, start: datetime, end: datetime, tenant_id: str | None
) -> AsyncIterator[UpstreamCostRow]:
    """The events with start ≤ occurred_at < end (of one tenant, or all) that carry an upstream
    cost, streamed in no particular order."""
    query, arguments = (
        (_UPSTREAM_COSTS_ALL, (start, end))
        if tenant_id is None
        else (_UPSTREAM_COSTS_OF_TENANT, (start, end, tenant_id))
    )
    async for row in connection.cursor(query, *arguments, prefetch=CURSOR_PREFETCH):
        yield UpstreamCostRow(*row)


async def period_drift(
    connection: Connection,
    *,
    start: datetime,
    end: datetime,
    tenant_id: str | None,
    tolerance: Decimal = DEFAULT_TOLERANCE,
) -> list[PairDrift]:
    """Every (provider, model) with upstream costs in [start, end): its events checked against
    the row in effect at each one's `occurred_at` (the table is read once, up front)."""
    table = await load_prices(connection, None)
    tally = DriftTally()
    async for row in events_with_upstream_cost(
        connection, start=start, end=end, tenant_id=tenant_id
    ):
        rows = (
            table.get((row.provider, row.model))
            if row.provider is not None and row.model is not None
            else None
        )
        tally.add(
            check_event(
                (row.provider, row.model),
                input_tokens=row.input_tokens,
                output_tokens=row.output_tokens,
                cached_input_tokens=row.cached_input_tokens,
                reasoning_tokens=row.reasoning_tokens,
                upstream_usd=row.upstream_cost_usd,
                price=in_effect(rows, row.occurred_at) if rows else None,
                tolerance=tolerance,
            )
        )
    return tally.by_pair()


# Per (tenant, deployment, provider, model): events whose token counts can be priced are summed
# (pricing is linear in them); the others' charges are summed apart, to be kept as billed.
_PAIR_USAGE = """
    SELECT tenant_id, deployment_id, provider, model, count(*) AS events,
           sum(customer_charge_usd) AS charge_usd,
           count(*) FILTER (WHERE {priceable}) AS priceable_events,
           coalesce(sum(input_tokens) FILTER (WHERE {priceable}), 0)::bigint AS input_tokens,
           coalesce(sum(output_tokens) FILTER (WHERE {priceable}), 0)::bigint AS output_tokens,
           coalesce(sum(cached_input_tokens) FILTER (WHERE {priceable}), 0)::bigint
               AS cached_input_tokens,
           coalesce(sum(reasoning_tokens) FILTER (WHERE {priceable}), 0)::bigint
               AS reasoning_tokens,
           coalesce(sum(customer_charge_usd) FILTER (WHERE NOT ({priceable})), 0)
               AS unpriceable_charge_usd
    FROM llm_usage_events
    WHERE occurred_at >= $1 AND occurred_at < $2 {{tenant}}
    GROUP BY tenant_id, deployment_id, provider, model
""".format(priceable="cached_input_tokens <= input_tokens AND reasoning_tokens <= output_tokens")
_PAIR_USAGE_ALL = _PAIR_USAGE.format(tenant="")
_PAIR_USAGE_OF_TENANT = _PAIR_USAGE.format(tenant="AND tenant_id = $3")


async def pair_usage(
    connection: Connection, *, start: datetime, end: datetime, tenant_id: str | None
) -> list[PairUsage]:
    """Exact usage per tenant, deployment, provider and model of the events with
    start ≤ occurred_at < end (of one tenant, or all)."""
    rows = (
        await connection.fetch(_PAIR_USAGE_ALL, start, end)
        if tenant_id is None
        else await connection.fetch(_PAIR_USAGE_OF_TENANT, start, end, tenant_id)
    )
    return [PairUsage(**dict(row)) for row in rows]
