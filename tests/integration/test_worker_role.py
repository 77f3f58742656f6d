"""The workers' role can do their work and nothing else: no DDL, no deleting usage."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest

from llm_usage.consumers.budget.handler import BudgetCounter
from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.domain.prices import new_price
from llm_usage.runtime.handler import Record
from llm_usage.storage.budget_holds import release_counted_holds, sweep_holds
from llm_usage.storage.prices import add_prices, load_prices
from tests import clock
from tests.integration.pipeline import encode, unique, usage_event
from tests.integration.test_budget_holds_storage import check_on
from tests.records import consumer_record


@pytest.fixture
async def worker(pool: asyncpg.Pool, database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as a login user that has only the `llm_usage_worker` role."""
    name = f"worker_{uuid.uuid4().hex[:10]}"
    await pool.execute(f"CREATE ROLE {name} LOGIN IN ROLE llm_usage_worker")
    connection = await asyncpg.connect(database_url, user=name)
    try:
        yield connection
    finally:
        await connection.close()
        await pool.execute(f"DROP ROLE {name}")


@pytest.fixture
async def worker_pool(worker: asyncpg.Connection, database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool logged in as the `worker` user, for the consumers' handlers."""
    user = await worker.fetchval("SELECT current_user")
    pool = await asyncpg.create_pool(database_url, user=user, min_size=1, max_size=1)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


def three_events_of(tenant: str) -> list[Record]:
    return [consumer_record(encode(usage_event(tenant)), offset=n) for n in range(3)]


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE llm_usage_events",
        "ALTER TABLE llm_usage_events ADD COLUMN x int",
        "DELETE FROM llm_usage_events",
        "UPDATE llm_usage_events SET customer_charge_usd = 0",
        "TRUNCATE llm_usage_events",
        "CREATE TABLE sneaky (id int)",
        "DELETE FROM budget_policy_audit",
        "DELETE FROM invoice_periods",
        # Price rows are only ever added: history must stay reproducible.
        "UPDATE prices SET input = 0",
        "DELETE FROM prices",
        "DELETE FROM price_changes",
    ],
)
async def test_a_worker_cannot_change_the_schema_or_remove_usage(
    worker: asyncpg.Connection, statement: str
) -> None:
    with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
        await worker.execute(statement)


async def test_a_worker_can_add_and_read_prices_with_its_role(worker: asyncpg.Connection) -> None:
    # The API and `llm-usage prices` log in with the role; the consumers read the table.
    provider = unique("provider")
    price = new_price(provider, "m", clock.now(), input=Decimal(1), output=Decimal(2))
    await add_prices(worker, [price], actor="worker")
    [stored] = (await load_prices(worker, [(provider, "m")]))[(provider, "m")]
    assert stored.input == price.input
    assert stored.effective_from == price.effective_from


async def test_a_worker_can_store_usage_with_its_role(
    worker_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    outcome = await UsageRecorder(pool=worker_pool, clock=clock.now).record_batch(
        three_events_of(tenant)
    )
    assert outcome.counts == {"recorded": 3}
    assert (
        await pool.fetchval("SELECT requests FROM usage_daily_totals WHERE tenant_id = $1", tenant)
        == 3
    )


async def test_a_worker_can_count_budgets_where_public_may_not_create_temporary_tables(
    worker_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    # A hardened database revokes TEMPORARY from PUBLIC; the budget consumer stages its batches
    # in temporary tables, so the worker role must hold the privilege itself.
    database = await pool.fetchval("SELECT current_database()")
    await pool.execute(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
    try:
        tenant = unique("tenant")
        outcome = await BudgetCounter(pool=worker_pool, clock=clock.now).record_batch(
            three_events_of(tenant)
        )
    finally:
        await pool.execute(f'GRANT TEMPORARY ON DATABASE "{database}" TO PUBLIC')
    assert +outcome.counts == {"recorded": 3}
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM budget_spend WHERE tenant_id = $1 AND scope_type = 'tenant'",
            tenant,
        )
        == 2
    )  # its day and its month


async def test_a_worker_can_check_budgets_settle_and_sweep_holds_with_its_role(
    worker: asyncpg.Connection, pool: asyncpg.Pool, database_url: str
) -> None:
    # The API checks (the function budget_check); the budget consumer settles and sweeps.
    tenant = unique("tenant")
    now = clock.now()
    await pool.execute(
        "INSERT INTO budget_policies (tenant_id, scope_type, scope_id, daily_limit_usd, "
        "enforcement) VALUES ($1, 'tenant', $1, 1, 'block')",
        tenant,
    )

    async def decide(request_id: str) -> str:
        return (await check_on(worker, tenant, request_id, now=now, hold_seconds=1)).decision

    assert [await decide("settled"), await decide("denied")] == ["allow", "deny"]
    async with worker.transaction():
        ended = await release_counted_holds(worker, [(tenant, "settled", Decimal(1))], now=now)
    assert [hold.how for hold in ended] == ["settled"]
    assert await decide("expiring") == "allow"  # the settlement made room for it

    # The sweeper takes two connections: one holds the round's lock, the other ends holds.
    user = await worker.fetchval("SELECT current_user")
    sweeper_pool = await asyncpg.create_pool(database_url, user=user, min_size=2, max_size=2)
    assert sweeper_pool is not None
    try:
        swept = await sweep_holds(sweeper_pool, now=now + timedelta(seconds=3), hold_seconds=1)
    finally:
        await sweeper_pool.close()
    assert swept.ran
    assert swept.forgotten >= 2
    mine = [(hold.gateway_request_id, hold.how) for hold in swept.ended if hold.tenant_id == tenant]
    assert mine == [("expiring", "expired")]
