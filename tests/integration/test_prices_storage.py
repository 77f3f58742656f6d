"""The price table on a real PostgreSQL: rows only added, judged at the database's clock under a
per-pair lock, all or nothing, each audited; an identical row again changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from llm_usage.domain.prices import PRICE_CHANGE_LEAD, Price, new_price
from llm_usage.storage.prices import (
    MAX_PAIR_LOCKS,
    PriceRefusedError,
    add_prices,
    find_prices,
    load_prices,
    price_history,
    price_json,
)
from tests.integration.pipeline import unique, wait_until

D = Decimal


async def db_now(pool: asyncpg.Pool) -> datetime:
    """The database's clock, which judges every addition."""
    moment: datetime = await pool.fetchval("SELECT clock_timestamp()")
    return moment


def as_given(rows: list[Price]) -> list[Price]:
    """The rows without when they were added, to compare with the rows given."""
    return [dataclasses.replace(price, created_at=None) for price in rows]


def row(provider: str, model: str, at: datetime, input: str = "2.5", output: str = "10") -> Price:
    return new_price(provider, model, at, input=D(input), output=D(output))


async def test_a_first_row_may_be_backdated_and_later_ones_start_after_the_lead(
    pool: asyncpg.Pool,
) -> None:
    provider, model = unique("openai"), "gpt-4o"
    now = await db_now(pool)
    first = new_price(
        provider,
        model,
        now - timedelta(days=40),
        input=D("2.5"),
        output=D("10"),
        cached_input=D("1.25"),
        request_fee_usd=D("0.0001"),
    )
    added = await add_prices(pool, [first], actor="alice")
    assert as_given(added.added) == [first]
    assert added.unchanged == []
    # Stamped with the database's clock when added: the consumers' lead for a first row.
    assert added.added[0].created_at is not None
    assert now <= added.added[0].created_at <= await db_now(pool)

    too_soon = row(provider, model, now + PRICE_CHANGE_LEAD - timedelta(minutes=1), "3")
    with pytest.raises(PriceRefusedError, match="at least 10 minutes from now") as refused:
        await add_prices(pool, [too_soon], actor="bob")
    assert "\n" not in str(refused.value)

    later = row(provider, model, now + PRICE_CHANGE_LEAD + timedelta(minutes=5), "3")
    added_later = await add_prices(pool, [later], actor="bob")

    async with pool.acquire() as connection:
        table = await load_prices(connection, [(provider, model), (provider, "absent")])
        history = await price_history(connection, provider)
    assert table == {(provider, model): [*added.added, *added_later.added]}
    assert as_given(table[(provider, model)]) == [first, later]
    assert table[(provider, model)][0].cached_input == D("1.25")
    assert table[(provider, model)][0].reasoning == D("10")  # defaults to the output price
    assert [(c.actor, c.old_price, c.new_price) for c in history] == [
        ("bob", price_json(first), price_json(later)),
        ("alice", None, price_json(first)),
    ]
    assert history[0].new_price["request_fee_usd"] == "0"
    assert history[1].new_price["request_fee_usd"] == "0.0001"


async def test_one_refused_row_adds_nothing_of_its_addition(pool: asyncpg.Pool) -> None:
    provider = unique("anthropic")
    now = await db_now(pool)
    await add_prices(pool, [row(provider, "claude", now - timedelta(days=1))], actor="alice")
    batch = [
        row(provider, "haiku", now - timedelta(days=1)),  # a new pair: allowed alone
        row(provider, "claude", now),  # a change without the lead: refused
    ]
    with pytest.raises(PriceRefusedError, match=f"{provider}/claude"):
        await add_prices(pool, batch, actor="bob")
    async with pool.acquire() as connection:
        assert set(await find_prices(connection, provider=provider)) == {(provider, "claude")}
        assert len(await price_history(connection, provider)) == 1


async def test_an_identical_row_again_changes_nothing_and_a_different_one_is_refused(
    pool: asyncpg.Pool,
) -> None:
    provider = unique("mistral")
    at = await db_now(pool) - timedelta(hours=3)
    first = row(provider, "large", at, input="2.50")
    await add_prices(pool, [first], actor="alice")

    again = await add_prices(pool, [row(provider, "large", at, input="2.5")], actor="alice")
    assert again.added == []
    assert as_given(again.unchanged) == [first]

    with pytest.raises(PriceRefusedError, match="already has a different row"):
        await add_prices(pool, [row(provider, "large", at, input="2.6")], actor="alice")
    async with pool.acquire() as connection:
        assert len(await price_history(connection, provider, "large")) == 1
        stored = (await load_prices(connection, [(provider, "large")]))[(provider, "large")]
    assert as_given(stored) == [first]


async def test_earliest_starts_a_new_pair_now_and_a_change_after_the_lead(
    pool: asyncpg.Pool,
) -> None:
    provider = unique("google")
    before = await db_now(pool)
    placeholder = before - timedelta(days=365)  # ignored with `earliest`
    created = await add_prices(
        pool, [row(provider, "gemini", placeholder)], earliest=True, actor="a"
    )
    changed = await add_prices(
        pool, [row(provider, "gemini", placeholder, "3")], earliest=True, actor="a"
    )
    after = await db_now(pool)
    assert before <= created.added[0].effective_from <= after
    assert (
        before + PRICE_CHANGE_LEAD <= changed.added[0].effective_from <= after + PRICE_CHANGE_LEAD
    )


async def test_a_dry_run_judges_and_adds_nothing(pool: asyncpg.Pool) -> None:
    provider = unique("cohere")
    at = await db_now(pool)
    dry = await add_prices(pool, [row(provider, "command", at)], actor="a", dry_run=True)
    assert as_given(dry.added) == [row(provider, "command", at)]
    async with pool.acquire() as connection:
        assert await find_prices(connection, provider=provider) == {}
        assert await price_history(connection, provider) == []


@pytest.mark.parametrize("first_adds", [1, MAX_PAIR_LOCKS + 1], ids=["one pair", "an import"])
async def test_a_second_adder_waits_for_the_first_and_is_judged_against_its_row(
    pool: asyncpg.Pool, database_url: str, first_adds: int
) -> None:
    provider = unique("racer")
    now = await db_now(pool)
    first = [row(provider, f"m{n}", now - timedelta(days=2)) for n in range(1, first_adds)]
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            first.append(row(provider, "m", now - timedelta(days=2)))
            await add_prices(holder, first, actor="first")
            # Also a first row of the pair, as far as anything committed shows: without the
            # lock it would be judged against no rows and added beside the first.
            second = asyncio.create_task(
                add_prices(pool, [row(provider, "m", now - timedelta(days=1))], actor="second")
            )

            async def second_waits_for_the_lock() -> bool:
                waiting = await pool.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                    "AND database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database())"
                )
                return bool(waiting)

            await wait_until(second_waits_for_the_lock, within=10, message="the second adder waits")
            assert not second.done()
        with pytest.raises(PriceRefusedError, match="at least 10 minutes from now"):
            await second
    finally:
        await holder.close()
    async with pool.acquire() as connection:
        history = await price_history(connection, provider)
    assert {change.actor for change in history} == {"first"}
    assert len(history) == first_adds


async def test_of_many_racing_first_rows_exactly_one_is_added(
    pool: asyncpg.Pool, database_url: str
) -> None:
    provider = unique("crowd")
    now = await db_now(pool)
    racers = 6
    adders = await asyncpg.create_pool(database_url, min_size=racers, max_size=racers)
    assert adders is not None
    try:
        outcomes = await asyncio.gather(
            *(
                add_prices(
                    adders, [row(provider, "m", now - timedelta(hours=n + 1))], actor=f"admin{n}"
                )
                for n in range(racers)
            ),
            return_exceptions=True,
        )
    finally:
        await adders.close()
    refused = [o for o in outcomes if isinstance(o, PriceRefusedError)]
    assert len(refused) == racers - 1, outcomes
    async with pool.acquire() as connection:
        assert len((await find_prices(connection, provider=provider))[(provider, "m")]) == 1
        assert len(await price_history(connection, provider)) == 1
