"""The spend counters' storage against a real PostgreSQL: what one batch's addition costs."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import asyncpg

from llm_usage.storage.budget_spend import add_staged_to_counters, stage_events
from tests.integration.pipeline import unique

_HOT_UPDATES = "SELECT pg_stat_get_xact_tuples_hot_updated('budget_spend'::regclass)"
_UPDATES = "SELECT pg_stat_get_xact_tuples_updated('budget_spend'::regclass)"


async def _add_once_per_tenant(pool: asyncpg.Pool, tenants: list[str]) -> tuple[int, int]:
    """One batch with an event per tenant (two counters each: its day and its month); the
    updates and HOT updates of counter rows that batch made."""
    async with pool.acquire() as connection, connection.transaction():
        await stage_events(
            connection,
            (
                (
                    f"{tenant}-{unique('event')}",
                    tenant,
                    None,
                    None,
                    None,
                    date(2026, 11, 14),
                    Decimal("0.5"),
                )
                for tenant in tenants
            ),
        )
        await add_staged_to_counters(connection)
        return await connection.fetchval(_UPDATES), await connection.fetchval(_HOT_UPDATES)


async def test_a_batch_adding_to_every_counter_on_its_pages_updates_them_in_place(
    pool: asyncpg.Pool,
) -> None:
    # Enough counters to fill many pages: with full pages (fillfactor 100) next to none of the
    # updates below would find room beside the old version, and each would also add an index
    # entry.
    tenants = [unique("hot-tenant") for _ in range(3_000)]
    assert await _add_once_per_tenant(pool, tenants) == (0, 0)  # the counters are created

    updated, in_place = await _add_once_per_tenant(pool, tenants)

    assert updated == 2 * len(tenants)
    assert in_place >= 0.95 * updated, f"{in_place} of {updated} updates were HOT"
    spend = await pool.fetchval(
        "SELECT sum(spend_usd) FROM budget_spend WHERE tenant_id = ANY($1::text[])", tenants
    )
    assert spend == Decimal("0.5") * 2 * 2 * len(tenants)
