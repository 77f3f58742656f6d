"""Budget periods past the horizon, pruned against a real PostgreSQL: their counters and their
published alerts go, in batches; what is inside the horizon and every unpublished alert stay."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from llm_usage.consumers.budget.handler import BudgetCounter
from llm_usage.domain.budgets import budget_horizon
from llm_usage.storage.budget_pruning import prune_budget_periods
from llm_usage.storage.migrate import migrate
from tests import clock
from tests.integration.pipeline import encode, unique, usage_event
from tests.integration.test_rollup import _with_database
from tests.records import consumer_record


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A database of the test's own: pruning deletes every tenant's old periods."""
    name = f"prune_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    pool = await asyncpg.create_pool(_with_database(database_url, name), min_size=1, max_size=2)
    assert pool is not None
    async with pool.acquire() as connection:
        await migrate(connection)
    yield pool
    await pool.close()
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


@pytest.mark.parametrize(
    ("now", "horizon"),
    [
        (datetime(2027, 3, 15, 12, tzinfo=UTC), date(2027, 2, 1)),
        (datetime(2027, 3, 1, 0, 0, tzinfo=UTC), date(2027, 2, 1)),
        (datetime(2027, 2, 28, 23, 59, 59, tzinfo=UTC), date(2027, 1, 1)),
        (datetime(2027, 1, 10, tzinfo=UTC), date(2026, 12, 1)),
        (datetime(2027, 2, 10, tzinfo=UTC), date(2027, 1, 1)),
    ],
)
def test_the_horizon_is_the_previous_utc_month(now: datetime, horizon: date) -> None:
    assert budget_horizon(now) == horizon
    # A period pruned ended a whole month ago at least: past the id window and the close grace.
    assert now - datetime.combine(horizon, datetime.min.time(), UTC) >= timedelta(days=28)


async def add_counter(pool: asyncpg.Pool, tenant: str, window: str, start: date) -> None:
    """A spend counter, and what checks held on it."""
    await pool.execute(
        'INSERT INTO budget_spend (tenant_id, scope_type, scope_id, "window", period_start, '
        "spend_usd) VALUES ($1, 'tenant', $1, $2, $3, 1)",
        tenant,
        window,
        start,
    )
    await pool.execute(
        'INSERT INTO budget_held (tenant_id, scope_type, scope_id, "window", period_start, '
        "placed_usd, ended_usd) VALUES ($1, 'tenant', $1, $2, $3, 2, 2)",
        tenant,
        window,
        start,
    )


async def add_alert(pool: asyncpg.Pool, tenant: str, start: date, *, published: bool) -> str:
    alert_id = unique("alert")
    await pool.execute(
        'INSERT INTO budget_alert_outbox (alert_id, tenant_id, scope_type, scope_id, "window", '
        "period_start, level, limit_usd, payload, published_at) "
        "VALUES ($1, $2, 'tenant', $2, 'monthly', $3, 'exceeded', $4, '{}', "
        "CASE WHEN $5 THEN now() END)",
        alert_id,
        tenant,
        start,
        Decimal("10"),
        published,
    )
    return alert_id


async def test_old_periods_go_in_batches_and_the_horizon_and_unpublished_alerts_stay(
    pool: asyncpg.Pool,
) -> None:
    horizon = budget_horizon(clock.now())
    before = horizon - timedelta(days=1)  # the last day of the month before the previous one
    old_month = before.replace(day=1)
    tenants = [unique("tenant") for _ in range(7)]
    for tenant in tenants:
        await add_counter(pool, tenant, "daily", before)
        await add_counter(pool, tenant, "daily", old_month)
        await add_counter(pool, tenant, "monthly", old_month)
        await add_counter(pool, tenant, "daily", horizon)  # inside: stays
        await add_counter(pool, tenant, "monthly", horizon)
        await add_counter(pool, tenant, "monthly", clock.this_month())
    old_published = [await add_alert(pool, t, old_month, published=True) for t in tenants]
    for tenant in tenants[:5]:  # corrections applied before the horizon go, later ones stay
        for applied_on in (before, horizon):
            await pool.execute(
                "INSERT INTO budget_corrections (tenant_id, correction_id, gateway_request_id, "
                "applied_at) VALUES ($1, $2, 'req', $3::date::timestamptz)",
                tenant,
                unique("correction"),
                applied_on,
            )
    old_unpublished = await add_alert(pool, tenants[0], before, published=False)
    inside = await add_alert(pool, tenants[1], horizon, published=True)

    async with pool.acquire() as connection:
        deleted = await prune_budget_periods(connection, before=horizon, batch_rows=4)
        assert deleted == 2 * 3 * len(tenants) + 5 + len(old_published)
        assert await prune_budget_periods(connection, before=horizon, batch_rows=4) == 0

    for table in ("budget_spend", "budget_held"):
        left = await pool.fetch(
            f'SELECT "window", period_start, count(*) FROM {table} GROUP BY 1, 2 ORDER BY 1, 2'
        )
        assert [tuple(row) for row in left] == [
            ("daily", horizon, len(tenants)),
            ("monthly", horizon, len(tenants)),
            ("monthly", clock.this_month(), len(tenants)),
        ], table
    kept = await pool.fetch(
        "SELECT applied_at FROM budget_corrections WHERE tenant_id = ANY($1)", tenants
    )
    assert sorted(row["applied_at"].date() for row in kept) == [horizon] * 5
    alerts = {
        row["alert_id"] for row in await pool.fetch("SELECT alert_id FROM budget_alert_outbox")
    }
    assert alerts == {old_unpublished, inside}

    # Once the relay has published it, the next run prunes it.
    await pool.execute(
        "UPDATE budget_alert_outbox SET published_at = now() WHERE alert_id = $1", old_unpublished
    )
    async with pool.acquire() as connection:
        assert await prune_budget_periods(connection, before=horizon) == 1


async def test_the_budget_consumer_counts_no_event_of_a_period_past_the_horizon(
    pool: asyncpg.Pool,
) -> None:
    """A pruned period is never counted again: its counter would start from zero and could alert
    a second time, now that the outbox no longer remembers its alerts."""
    horizon = budget_horizon(clock.now())
    tenant = unique("tenant")
    old, inside = horizon - timedelta(days=1), horizon
    records = [
        consumer_record(encode(usage_event(tenant, occurred_at=f"{day}T12:00:00Z")), offset=n)
        for n, day in enumerate((old, inside))
    ]
    outcome = await BudgetCounter(pool=pool, clock=clock.now).record_batch(records)
    assert +outcome.counts == {"recorded": 2}
    periods = await pool.fetch(
        'SELECT DISTINCT "window", period_start FROM budget_spend WHERE tenant_id = $1 '
        "ORDER BY 1, 2",
        tenant,
    )
    assert [tuple(row) for row in periods] == [("daily", inside), ("monthly", inside)]
