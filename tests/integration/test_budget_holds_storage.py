"""Budget checks and holds against a real PostgreSQL (design §3, §4, §5, §10): the check's
function under concurrency, repeats, settlement, the sweeper, and the migration run twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from llm_usage.domain.holds import CheckOutcome, hold_counters
from llm_usage.domain.periods import utc_day
from llm_usage.storage.budget_holds import (
    held_by_counter,
    place_check,
)
from tests import clock
from tests.integration.pipeline import unique

HOLD_SECONDS = 300
CONCURRENT_CHECKS = 500


@pytest.fixture
async def wide_pool(database_url: str, pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """Twenty connections on the migrated database (`pool` migrates it): enough checks in
    flight at once for them to queue on the locks."""
    pool = await asyncpg.create_pool(database_url, min_size=20, max_size=20)
    try:
        yield pool
    finally:
        await pool.close()


async def block_limit(
    pool: asyncpg.Pool,
    tenant_id: str,
    *,
    scope_type: str = "tenant",
    scope_id: str | None = None,
    daily: Decimal | None = None,
    monthly: Decimal | None = None,
    enforcement: str = "block",
) -> None:
    await pool.execute(
        """
        INSERT INTO budget_policies (tenant_id, scope_type, scope_id, daily_limit_usd,
                                     monthly_limit_usd, enforcement)
        VALUES ($1, $2, $3, $4, $5, $6)
        """,
        tenant_id,
        scope_type,
        scope_id or tenant_id,
        daily,
        monthly,
        enforcement,
    )


async def check(
    pool: asyncpg.Pool,
    tenant_id: str,
    request_id: str,
    amount: Decimal = Decimal(1),
    *,
    now: datetime,
    user_id: str | None = None,
    deployment_id: str | None = None,
    agent_id: str | None = None,
) -> CheckOutcome:
    async with pool.acquire() as connection:
        return await place_check(
            connection,
            tenant_id=tenant_id,
            gateway_request_id=request_id,
            deployment_id=deployment_id,
            user_id=user_id,
            agent_id=agent_id,
            amount_usd=amount,
            now=now,
            hold_seconds=HOLD_SECONDS,
        )


async def hold_rows(pool: asyncpg.Pool, tenant_id: str) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM budget_holds WHERE tenant_id = $1", tenant_id)
    return {row["gateway_request_id"]: row for row in rows}


async def assert_held_is_open_amounts(pool: asyncpg.Pool, tenant_id: str) -> None:
    """The bookkeeping identity: per counter, placed - ended = Σ amount of its open holds."""
    open_sums: dict[tuple[object, ...], Decimal] = {}
    for row in (await hold_rows(pool, tenant_id)).values():
        if row["state"] == "open":
            for key in hold_counters(
                tenant_id, row["deployment_id"], row["user_id"], row["agent_id"], row["day"]
            ):
                open_sums[key] = open_sums.get(key, Decimal(0)) + row["amount_usd"]
    held = await held_by_counter(pool, tenant_id)  # type: ignore[arg-type]
    assert {key: value for key, value in held.items() if value} == open_sums


async def test_500_concurrent_checks_against_a_50_dollar_limit_allow_exactly_50(
    wide_pool: asyncpg.Pool,
) -> None:
    tenant = unique("holds-tenant")
    await block_limit(wide_pool, tenant, daily=Decimal(50), monthly=Decimal(1000))
    now = clock.now()

    outcomes = await asyncio.gather(
        *(check(wide_pool, tenant, f"r{n}", now=now) for n in range(CONCURRENT_CHECKS))
    )

    decisions = Counter(outcome.decision for outcome in outcomes)
    assert decisions == {"allow": 50, "deny": CONCURRENT_CHECKS - 50}
    for outcome in outcomes:
        if outcome.decision == "deny":
            assert [(d.scope_type, d.window) for d in outcome.denied_by] == [("tenant", "daily")]
            assert outcome.denied_by[0].held_usd == Decimal(50)
            assert outcome.hold_expires_at is None
        else:
            assert outcome.hold_expires_at == now + timedelta(seconds=HOLD_SECONDS)
    held = await held_by_counter(wide_pool, tenant)  # type: ignore[arg-type]
    day = utc_day(now)
    assert held == {key: Decimal(50) for key in hold_counters(tenant, None, None, None, day)}
    await assert_held_is_open_amounts(wide_pool, tenant)
