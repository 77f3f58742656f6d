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

from llm_usage.domain.budgets import SpendKey
from llm_usage.domain.holds import CheckOutcome, hold_counters
from llm_usage.domain.periods import utc_day
from llm_usage.storage.budget_holds import (
    HOLD_SWEEP_LOCK_KEY,
    BudgetCheckBusy,
    EndedHold,
    SweepResult,
    held_by_counter,
    place_check,
    release_counted_holds,
    request_counted,
    sweep_holds,
)
from llm_usage.storage.distribution import distribute
from llm_usage.storage.flavour import citus_installed
from llm_usage.storage.migrate import DEFAULT_RETENTION_MONTHS, bundled_migrations, migrate
from llm_usage.storage.partitions import create_partitions
from llm_usage.storage.pool import Connection
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
        return await check_on(
            connection,
            tenant_id,
            request_id,
            amount,
            now=now,
            user_id=user_id,
            deployment_id=deployment_id,
            agent_id=agent_id,
        )


async def check_on(
    connection: Connection,
    tenant_id: str,
    request_id: str,
    amount: Decimal = Decimal(1),
    *,
    now: datetime,
    hold_seconds: int = HOLD_SECONDS,
    user_id: str | None = None,
    deployment_id: str | None = None,
    agent_id: str | None = None,
) -> CheckOutcome:
    return await place_check(
        connection,
        tenant_id=tenant_id,
        gateway_request_id=request_id,
        deployment_id=deployment_id,
        user_id=user_id,
        agent_id=agent_id,
        amount_usd=amount,
        now=now,
        hold_seconds=hold_seconds,
    )


async def held_now(pool: asyncpg.Pool, tenant_id: str) -> dict[SpendKey, Decimal]:
    async with pool.acquire() as connection:
        return await held_by_counter(connection, tenant_id)


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
    held = await held_now(pool, tenant_id)
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
    held = await held_now(wide_pool, tenant)
    day = utc_day(now)
    assert held == {key: Decimal(50) for key in hold_counters(tenant, None, None, None, day)}
    await assert_held_is_open_amounts(wide_pool, tenant)


async def test_checks_spread_over_six_scopes_hold_every_limit(wide_pool: asyncpg.Pool) -> None:
    tenant = unique("holds-tenant")
    users = [f"user-{n}" for n in range(6)]
    await block_limit(wide_pool, tenant, daily=Decimal(50))
    for user in users:
        await block_limit(wide_pool, tenant, scope_type="user", scope_id=user, daily=Decimal(10))
    now = clock.now()

    outcomes = await asyncio.gather(
        *(
            check(wide_pool, tenant, f"r{n}", now=now, user_id=users[n % len(users)])
            for n in range(CONCURRENT_CHECKS)
        )
    )

    allowed = Counter(
        users[n % len(users)] for n, outcome in enumerate(outcomes) if outcome.decision == "allow"
    )
    assert sum(allowed.values()) == 50
    assert max(allowed.values()) <= 10
    held = await held_now(wide_pool, tenant)
    assert held[(tenant, "tenant", tenant, "daily", utc_day(now))] == Decimal(50)
    for user in users:
        assert held[(tenant, "user", user, "daily", utc_day(now))] == allowed[user]
    await assert_held_is_open_amounts(wide_pool, tenant)


async def test_a_repeated_check_answers_the_first_answer_and_holds_once(
    wide_pool: asyncpg.Pool,
) -> None:
    tenant = unique("holds-tenant")
    await block_limit(wide_pool, tenant, daily=Decimal(3))
    now = clock.now()

    at_once = await asyncio.gather(
        *(check(wide_pool, tenant, "same", Decimal(2), now=now) for _ in range(20))
    )
    assert Counter(outcome.answer for outcome in at_once) == {"new": 1, "repeat": 19}
    assert {(o.decision, o.hold_expires_at, o.estimated_charge_usd) for o in at_once} == {
        ("allow", now + timedelta(seconds=HOLD_SECONDS), Decimal(2))
    }
    denied = await check(wide_pool, tenant, "denied", Decimal(2), now=now)
    assert denied.decision == "deny"
    assert [d.to_json() for d in denied.denied_by] == [
        {
            "scope_type": "tenant",
            "scope_id": tenant,
            "window": "daily",
            "limit_usd": "3",
            "spend_usd": "0",
            "held_usd": "2",
        }
    ]
    # Later, with other amounts and another instant: the first answers still, and nothing more
    # is held.
    later = now + timedelta(seconds=5)
    again = await check(wide_pool, tenant, "same", Decimal(1), now=later)
    denied_again = await check(wide_pool, tenant, "denied", Decimal(0), now=later)

    assert again == CheckOutcome("allow", (), at_once[0].hold_expires_at, Decimal(2), "repeat")
    assert denied_again == CheckOutcome("deny", denied.denied_by, None, Decimal(2), "repeat")
    held = await held_now(wide_pool, tenant)
    assert set(held.values()) == {Decimal(2)}
    await assert_held_is_open_amounts(wide_pool, tenant)


async def test_alert_only_limits_deny_nothing_but_are_held_on(pool: asyncpg.Pool) -> None:
    tenant = unique("holds-tenant")
    await block_limit(pool, tenant, daily=Decimal(1), enforcement="alert")
    now = clock.now()

    outcomes = [await check(pool, tenant, f"r{n}", now=now) for n in range(3)]

    assert [outcome.decision for outcome in outcomes] == ["allow"] * 3
    held = await held_now(pool, tenant)
    assert held[(tenant, "tenant", tenant, "daily", utc_day(now))] == Decimal(3)


async def test_spend_counts_against_the_limit(pool: asyncpg.Pool) -> None:
    tenant = unique("holds-tenant")
    await block_limit(pool, tenant, monthly=Decimal(10))
    now = clock.now()
    month = utc_day(now).replace(day=1)
    await pool.execute(
        'INSERT INTO budget_spend (tenant_id, scope_type, scope_id, "window", period_start, '
        "spend_usd) VALUES ($1, 'tenant', $1, 'monthly', $2, 9.5)",
        tenant,
        month,
    )

    exact = await check(pool, tenant, "fits", Decimal("0.5"), now=now)
    over = await check(pool, tenant, "over", Decimal("0.000001"), now=now)

    assert exact.decision == "allow"  # spend + held + estimate = limit is allowed
    assert over.decision == "deny"
    assert [d.to_json() for d in over.denied_by] == [
        {
            "scope_type": "tenant",
            "scope_id": tenant,
            "window": "monthly",
            "limit_usd": "10",
            "spend_usd": "9.5",
            "held_usd": "0.5",
        }
    ]


async def test_a_check_waiting_too_long_for_its_counters_is_busy(pool: asyncpg.Pool) -> None:
    tenant = unique("holds-tenant")
    now = clock.now()
    await check(pool, tenant, "first", now=now)  # creates the counters
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT FROM budget_held WHERE tenant_id = $1 FOR UPDATE", tenant)
        with pytest.raises(BudgetCheckBusy):
            await check(pool, tenant, "second", now=now)
    assert await check(pool, tenant, "second", now=now) == CheckOutcome(
        "allow", (), now + timedelta(seconds=HOLD_SECONDS), Decimal(1), "new"
    )


async def count_event(
    connection: Connection,
    tenant_id: str,
    request_id: str,
    charge: Decimal,
    occurred_at: datetime,
) -> None:
    """What a batch does to the id window for one newly counted event."""
    await connection.execute(
        """
        INSERT INTO usage_event_ids (gateway_request_id, tenant_id, input_tokens,
            output_tokens, cached_input_tokens, reasoning_tokens, total_tokens,
            customer_charge_usd, occurred_at, counted)
        VALUES ($1, $2, 0, 0, 0, 0, 0, $3, $4, true)
        """,
        request_id,
        tenant_id,
        charge,
        occurred_at,
    )


async def test_request_counted_is_the_tenants_counted_event(pool: asyncpg.Pool) -> None:
    tenant, other = unique("holds-tenant"), unique("holds-tenant")
    request_id = unique("request")
    async with pool.acquire() as connection:
        assert not await request_counted(connection, tenant, request_id)
        await count_event(connection, tenant, request_id, Decimal(1), clock.now())
        assert await request_counted(connection, tenant, request_id)
        assert not await request_counted(connection, other, request_id)


async def test_counting_the_event_settles_its_hold_once(pool: asyncpg.Pool) -> None:
    tenant = unique("holds-tenant")
    request_id = unique("request")
    now = clock.now()
    await check(pool, tenant, request_id, Decimal(2), now=now, user_id="u", agent_id="a")
    settled_at = now + timedelta(seconds=3)

    async with pool.acquire() as connection, connection.transaction():
        await count_event(connection, tenant, request_id, Decimal("2.5"), now)
        ended = await release_counted_holds(
            connection,
            [(tenant, request_id, Decimal("2.5")), (tenant, unique("unchecked"), Decimal(1))],
            now=settled_at,
        )
    async with pool.acquire() as connection, connection.transaction():
        again = await release_counted_holds(
            connection, [(tenant, request_id, Decimal("2.5"))], now=settled_at
        )

    assert ended == [
        EndedHold(tenant, request_id, Decimal(2), utc_day(now), Decimal("2.5"), "settled")
    ]
    assert again == []
    row = (await hold_rows(pool, tenant))[request_id]
    assert (row["state"], row["ended_by"], row["ended_at"], row["settled_charge_usd"]) == (
        "settled",
        "consumer",
        settled_at,
        Decimal("2.5"),
    )
    held = await held_now(pool, tenant)
    assert len(held) == 6
    assert set(held.values()) == {Decimal(0)}


async def test_a_settlement_rolled_back_leaves_the_hold_open(pool: asyncpg.Pool) -> None:
    tenant = unique("holds-tenant")
    now = clock.now()
    await check(pool, tenant, "r", now=now)

    async with pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        ended = await release_counted_holds(connection, [(tenant, "r", Decimal(1))], now=now)
        await transaction.rollback()  # the batch failed before COMMIT

    assert [hold.gateway_request_id for hold in ended] == ["r"]

    assert (await hold_rows(pool, tenant))["r"]["state"] == "open"
    await assert_held_is_open_amounts(pool, tenant)


async def test_a_check_racing_the_batch_that_counts_it_is_settled_by_the_sweeper(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("holds-tenant")
    request_id = unique("request")
    now = clock.now()
    async with pool.acquire() as batch:
        transaction = batch.transaction()
        await transaction.start()
        await count_event(batch, tenant, request_id, Decimal("0.7"), now)
        assert (
            await release_counted_holds(batch, [(tenant, request_id, Decimal("0.7"))], now=now)
            == []
        )
        # The check runs before the batch commits: it cannot see the count, nor the batch its hold.
        async with pool.acquire() as api:
            assert not await request_counted(api, tenant, request_id)
            outcome = await check_on(api, tenant, request_id, now=now)
        await transaction.commit()
    assert outcome.decision == "allow"
    assert (await hold_rows(pool, tenant))[request_id]["state"] == "open"

    # The counted pass finds it about 10 s after the check, long before it expires.
    swept = await sweep_holds(pool, now=now + timedelta(seconds=15), hold_seconds=HOLD_SECONDS)

    assert swept.ran
    mine = [hold for hold in swept.ended if hold.tenant_id == tenant]
    assert mine == [
        EndedHold(tenant, request_id, Decimal(1), utc_day(now), Decimal("0.7"), "settled_late")
    ]
    row = (await hold_rows(pool, tenant))[request_id]
    assert (row["state"], row["ended_by"], row["settled_charge_usd"]) == (
        "settled",
        "sweeper",
        Decimal("0.7"),
    )
    assert set((await held_now(pool, tenant)).values()) == {Decimal(0)}


async def test_expired_holds_end_once_and_ended_rows_are_forgotten_later(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("holds-tenant")
    await block_limit(pool, tenant, scope_type="deployment", scope_id="d", daily=Decimal(2))
    now = clock.now()
    for n in range(3):
        await check(pool, tenant, f"r{n}", now=now, deployment_id="d")
    await check(pool, tenant, "late", now=now + timedelta(seconds=HOLD_SECONDS))

    before = await sweep_holds(
        pool, now=now + timedelta(seconds=HOLD_SECONDS - 1), hold_seconds=HOLD_SECONDS
    )
    expiry = now + timedelta(seconds=HOLD_SECONDS + 1)
    first = await sweep_holds(pool, now=expiry, hold_seconds=HOLD_SECONDS)
    second = await sweep_holds(pool, now=expiry, hold_seconds=HOLD_SECONDS)

    assert [hold for hold in before.ended if hold.tenant_id == tenant] == []
    mine = sorted(
        (hold.gateway_request_id, hold.how) for hold in first.ended if hold.tenant_id == tenant
    )
    assert mine == [("r0", "expired"), ("r1", "expired")]
    assert [hold for hold in second.ended if hold.tenant_id == tenant] == []
    rows = await hold_rows(pool, tenant)
    assert {request_id: row["state"] for request_id, row in rows.items()} == {
        "r0": "expired",
        "r1": "expired",
        "r2": "denied",
        "late": "open",
    }
    assert (rows["r0"]["ended_by"], rows["r0"]["ended_at"]) == ("sweeper", expiry)
    await assert_held_is_open_amounts(pool, tenant)
    assert first.open_holds >= 1
    assert first.oldest_open_age_seconds >= 1

    # Ended rows are remembered for hold_seconds past their expiry, then forgotten; open ones
    # never are (the late one expires in this sweep and is remembered in its turn).
    remembered = await sweep_holds(
        pool, now=now + timedelta(seconds=2 * HOLD_SECONDS), hold_seconds=HOLD_SECONDS
    )
    assert set(await hold_rows(pool, tenant)) == {"r0", "r1", "r2", "late"}
    forgot = await sweep_holds(
        pool, now=now + timedelta(seconds=2 * HOLD_SECONDS + 1), hold_seconds=HOLD_SECONDS
    )
    assert [(h.gateway_request_id, h.how) for h in remembered.ended if h.tenant_id == tenant] == [
        ("late", "expired")
    ]
    assert forgot.forgotten >= 3
    assert set(await hold_rows(pool, tenant)) == {"late"}
    # A forgotten id is decided afresh.
    assert (await check(pool, tenant, "r2", now=now)).answer == "new"


async def test_an_expiring_hold_whose_event_is_counted_ends_settled_late(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("holds-tenant")
    now = clock.now()
    await check(pool, tenant, "r", Decimal(3), now=now)
    async with pool.acquire() as connection:
        await count_event(connection, tenant, "r", Decimal(4), now)

    swept = await sweep_holds(
        pool, now=now + timedelta(seconds=HOLD_SECONDS), hold_seconds=HOLD_SECONDS
    )

    assert [h for h in swept.ended if h.tenant_id == tenant] == [
        EndedHold(tenant, "r", Decimal(3), utc_day(now), Decimal(4), "settled_late")
    ]
    assert (await hold_rows(pool, tenant))["r"]["state"] == "settled"


async def test_one_sweeper_works_at_a_time(wide_pool: asyncpg.Pool) -> None:
    tenant = unique("holds-tenant")
    now = clock.now()
    for n in range(20):
        await check(wide_pool, tenant, f"r{n}", now=now)
    expiry = now + timedelta(seconds=HOLD_SECONDS)

    async with wide_pool.acquire() as other, other.transaction():
        await other.execute("SELECT pg_advisory_xact_lock($1)", HOLD_SWEEP_LOCK_KEY)
        skipped = await sweep_holds(wide_pool, now=expiry, hold_seconds=HOLD_SECONDS)
    assert skipped == SweepResult(False, [], 0, 0, 0.0)
    assert {row["state"] for row in (await hold_rows(wide_pool, tenant)).values()} == {"open"}

    rounds = await asyncio.gather(
        *(sweep_holds(wide_pool, now=expiry, hold_seconds=HOLD_SECONDS) for _ in range(4))
    )

    ended = [h.gateway_request_id for r in rounds for h in r.ended if h.tenant_id == tenant]
    assert sorted(ended) == sorted(f"r{n}" for n in range(20))
    assert set((await held_now(wide_pool, tenant)).values()) == {Decimal(0)}


async def test_0015_upgrades_a_running_database_and_runs_twice(empty_database_url: str) -> None:
    # As `llm-usage migrate` upgrades a live database: on Citus its tables are distributed
    # already, and the new ones are distributed after.
    connection = await asyncpg.connect(empty_database_url)
    try:
        await migrate(connection, until="0014")
        # A live database has its months (migrating `until` stops before creating them).
        await create_partitions(
            connection, today=clock.today(), retention_months=DEFAULT_RETENTION_MONTHS
        )
        citus = await citus_installed(connection)
        if citus:
            await distribute(connection)
        assert await migrate(connection, until="0015") == ["0015_budget_holds"]
        if citus:
            assert sorted(await distribute(connection)) == [
                "budget_held (on tenant_id, with llm_usage_events)",
                "budget_holds (on tenant_id, with llm_usage_events)",
            ]
        tenant = unique("holds-tenant")
        await connection.execute(
            "INSERT INTO budget_policies (tenant_id, scope_type, scope_id, daily_limit_usd, "
            "enforcement) VALUES ($1, 'tenant', $1, 1, 'block')",
            tenant,
        )
        now = clock.now()

        async def decide(request_id: str) -> str:
            outcome = await check_on(connection, tenant, request_id, now=now)
            return f"{outcome.decision} {outcome.answer}"

        assert [await decide("kept"), await decide("other")] == ["allow new", "deny new"]

        (migration,) = [m for m in bundled_migrations() if m.version == "0015_budget_holds"]
        async with connection.transaction():
            await connection.execute(migration.sql)

        assert [await decide("kept"), await decide("other")] == ["allow repeat", "deny repeat"]
        # Room on every page for the checks' updates to stay HOT, as budget_spend's.
        options = await connection.fetchval(
            "SELECT reloptions FROM pg_class WHERE relname = 'budget_held'"
        )
        assert options == ["fillfactor=50"]
    finally:
        await connection.close()


async def test_a_sweep_needs_one_connection(pool: asyncpg.Pool, database_url: str) -> None:
    # The budget consumer's pool may be of one connection (BUDGET_DATABASE_POOL_SIZE=1).
    tenant = unique("holds-tenant")
    now = clock.now()
    await check(pool, tenant, "r", now=now)
    single = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    assert single is not None
    try:
        swept = await asyncio.wait_for(
            sweep_holds(
                single, now=now + timedelta(seconds=HOLD_SECONDS), hold_seconds=HOLD_SECONDS
            ),
            timeout=30,
        )
        # The round's lock went with it: the next round works too.
        again = await sweep_holds(single, now=now, hold_seconds=HOLD_SECONDS)
    finally:
        await single.close()
    assert [(h.gateway_request_id, h.how) for h in swept.ended if h.tenant_id == tenant] == [
        ("r", "expired")
    ]
    assert again.ran
