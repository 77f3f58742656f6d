"""Late usage found from marks, against a real PostgreSQL: the usage batch marks a closed month
it adds to, the rollup trues the marked tenants up until the month that bills them closes, and
the close fences batches in flight (a batch commits before the close reads the month, or sees
the month closed and marks it), proven with two connections."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg

from llm_usage.domain.money import usd_to_cents
from llm_usage.domain.usage import Usage
from llm_usage.rollup.run import close_month, run_rollup
from llm_usage.storage.invoice_lines import late_marks
from llm_usage.storage.migrate import bundled_migrations
from llm_usage.storage.usage_totals import add_to_daily_totals
from tests.integration.pipeline import unique
from tests.integration.test_rollup import event, store

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)  # October and earlier have ended
NOW_MONTH = f"{NOW:%Y-%m}"  # the open month the injected clock is in
T = TypeVar("T")


async def marks(pool: asyncpg.Pool) -> set[tuple[str, str]]:
    async with pool.acquire() as connection:
        return {(mark.tenant_id, mark.period) for mark in await late_marks(connection)}


async def billed_cents(pool: asyncpg.Pool, tenant: str) -> dict[str, int]:
    """Cents billed so far per original month, over every stored line of `tenant`."""
    billed: dict[str, int] = defaultdict(int)
    for row in await pool.fetch(
        "SELECT original_period, amount_cents FROM invoice_lines WHERE tenant_id = $1", tenant
    ):
        billed[row["original_period"]] += row["amount_cents"]
    return dict(billed)


async def waiting_for_a_lock(pool: asyncpg.Pool, task: asyncio.Task[T]) -> None:
    """Return once some backend waits for an advisory lock; fail if `task` ends first."""
    for _ in range(200):
        assert not task.done(), "the statement did not wait for the lock"
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("nothing waited for the month's lock")


async def held_before_its_lines(pool: asyncpg.Pool, closing: asyncio.Task[T]) -> None:
    """Return once the close waits for the lock on `invoice_lines` (it has read the month and
    holds the month's lock); fail if it ends first."""
    for _ in range(200):
        assert not closing.done(), "the close did not wait to write its lines"
        if await pool.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE c.relname = 'invoice_lines' AND NOT l.granted "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the close never reached its lines")


async def within(seconds: float, work: Awaitable[T]) -> T:
    return await asyncio.wait_for(work, seconds)


async def test_a_batch_adding_to_a_closed_month_marks_it_and_the_next_month_bills_it(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = rollup_db
    tenant, other = unique("tenant"), unique("tenant")
    await store(pool, [event(tenant, "2026-09-10", "1.00"), event(other, "2026-09-11", "2.00")])
    assert await marks(pool) == set(), "an open month is never marked"
    await close_month(pool, period="2026-09", now=NOW)

    # Late for September, and on time for October: only September is marked, only for `tenant`.
    await store(pool, [event(tenant, "2026-09-12", "0.40"), event(tenant, "2026-10-01", "3")])
    assert await marks(pool) == {(tenant, "2026-09")}
    batches = await pool.fetchval(
        "SELECT batches FROM usage_late_marks WHERE tenant_id = $1", tenant
    )
    await store(pool, [event(tenant, "2026-09-13", "0.10")])
    assert (
        await pool.fetchval("SELECT batches FROM usage_late_marks WHERE tenant_id = $1", tenant)
        == batches + 1
    ), "a second batch bumps the mark"

    # Every run of October (the first open month after September) carries the true-up.
    for _ in range(2):
        preview = await run_rollup(pool, period="2026-10")
        adjustments = [line for line in preview.lines if line.kind == "llm_usage_adjustment"]
        assert [
            (line.tenant_id, line.original_period, line.amount_cents) for line in adjustments
        ] == [(tenant, "2026-09", 50)]
    assert await marks(pool) == {(tenant, "2026-09")}, "a preview keeps the marks"

    await close_month(pool, period="2026-10", now=NOW)
    assert await marks(pool) == set(), "the close of the month that billed them forgets them"
    assert await billed_cents(pool, tenant) == {"2026-09": 150, "2026-10": 300}

    # Late again, after both closes: marked again, billed in November.
    await store(pool, [event(tenant, "2026-09-20", "0.05")])
    assert await marks(pool) == {(tenant, "2026-09")}
    await run_rollup(pool, period=NOW_MONTH)
    assert await billed_cents(pool, tenant) == {"2026-09": 155, "2026-10": 300}
    assert await billed_cents(pool, other) == {"2026-09": 200}


async def test_a_batch_under_way_when_the_close_starts_is_in_the_final_lines(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    """Two connections: the batch has added to October and not committed when the close
    starts; the close waits for it, and its usage is in October's final lines."""
    url, pool = rollup_db
    tenant = unique("tenant")
    await store(pool, [event(tenant, "2026-10-03", "1.00")])
    batch = await asyncpg.connect(url)
    try:
        transaction = batch.transaction()
        await transaction.start()
        await add_to_daily_totals(
            batch, {(tenant, "dep-1", date(2026, 10, 4)): Usage(Decimal("0.25"), 1, 1, 1)}
        )
        closing = asyncio.create_task(close_month(pool, period="2026-10", now=NOW))
        await waiting_for_a_lock(pool, closing)
        await transaction.commit()  # the batch commits after the close started
    finally:
        await batch.close()
    closed = await within(30, closing)
    assert [(line.tenant_id, line.amount_cents) for line in closed.lines] == [(tenant, 125)]
    assert await marks(pool) == set(), "its usage is billed: nothing is left to true up"


async def test_a_batch_that_comes_while_the_close_runs_sees_the_month_closed_and_marks_it(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    """Two connections: the close holds October's lock (held up on a third connection just
    before it writes its lines); the batch waits for it, then finds October closed and marks
    it; November's run bills the difference: every cent once."""
    url, pool = rollup_db
    tenant = unique("tenant")
    await store(pool, [event(tenant, "2026-10-03", "1.00")])
    blocker = await asyncpg.connect(url)
    try:
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("LOCK TABLE invoice_lines IN EXCLUSIVE MODE")
        closing = asyncio.create_task(close_month(pool, period="2026-10", now=NOW))
        # The close has read October and waits to write its lines, holding October's lock.
        await held_before_its_lines(pool, closing)
        batch = await asyncpg.connect(url)
        try:
            adding = asyncio.create_task(
                store_on(
                    batch, {(tenant, "dep-1", date(2026, 10, 5)): Usage(Decimal("0.25"), 1, 1, 1)}
                )
            )
            await waiting_for_a_lock(pool, adding)
            await holding.rollback()  # let the close finish: it commits before the batch goes on
            closed = await within(30, closing)
            await within(30, adding)
        finally:
            await batch.close()
    finally:
        await blocker.close()
    assert [(line.tenant_id, line.amount_cents) for line in closed.lines] == [(tenant, 100)]
    assert await marks(pool) == {(tenant, "2026-10")}
    november = await run_rollup(pool, period=NOW_MONTH)
    assert [(line.kind, line.original_period, line.amount_cents) for line in november.lines] == [
        ("llm_usage_adjustment", "2026-10", 25)
    ]


async def store_on(connection: asyncpg.Connection, totals: dict[Any, Usage]) -> None:
    async with connection.transaction():
        await add_to_daily_totals(connection, totals)


async def test_the_close_keeps_a_mark_a_batch_bumped_while_it_ran(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    """September is closed and marked; while October's close runs (held up before it writes its
    lines), a batch adds late September usage: the close bills what it read and keeps the mark,
    so November bills the rest."""
    url, pool = rollup_db
    tenant = unique("tenant")
    await store(pool, [event(tenant, "2026-09-03", "1.00")])
    await close_month(pool, period="2026-09", now=NOW)
    await store(pool, [event(tenant, "2026-09-04", "0.30"), event(tenant, "2026-10-04", "2")])
    blocker = await asyncpg.connect(url)
    try:
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("LOCK TABLE invoice_lines IN EXCLUSIVE MODE")
        closing = asyncio.create_task(close_month(pool, period="2026-10", now=NOW))
        await held_before_its_lines(pool, closing)
        # September's lock is not October's: this batch does not wait for the close.
        await within(10, store(pool, [event(tenant, "2026-09-05", "0.07")]))
        await holding.rollback()
        await within(30, closing)
    finally:
        await blocker.close()
    assert await marks(pool) == {(tenant, "2026-09")}, "the bumped mark was forgotten"
    await run_rollup(pool, period=NOW_MONTH)
    assert await billed_cents(pool, tenant) == {"2026-09": 137, "2026-10": 200}


async def test_daily_total_updates_are_hot(rollup_db: tuple[str, asyncpg.Pool]) -> None:
    """No indexed column changes when a day's total grows: PostgreSQL updates it in place (HOT),
    without new index entries. The `(day, updated_at)` index made every update non-HOT."""
    _, pool = rollup_db
    tenant = unique("tenant")
    key = (tenant, "dep-1", date(2026, 10, 6))
    async with pool.acquire() as connection, connection.transaction():
        for _ in range(5):
            await add_to_daily_totals(connection, {key: Usage(Decimal("0.01"), 1, 1, 1)})
        counts = await connection.fetchrow(
            "SELECT pg_stat_get_xact_tuples_updated(c.oid), "
            "pg_stat_get_xact_tuples_hot_updated(c.oid) "
            "FROM pg_class c WHERE c.relname = 'usage_daily_totals'"
        )
    assert counts is not None
    assert tuple(counts) == (4, 4)
    indexes = await pool.fetch(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'usage_daily_totals'"
    )
    assert not [row for row in indexes if "updated_at" in row["indexdef"]]


async def test_late_usage_of_many_tenants_is_exact_after_closes_in_a_row(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    """Random late usage over several closes: every month bills its exact total once."""
    _, pool = rollup_db
    tenants = [unique("tenant") for _ in range(4)]
    stored: list[dict[str, Any]] = []
    n = 0

    async def add(month: str, spread: Sequence[str]) -> None:
        nonlocal n
        batch = []
        for tenant in spread:
            n += 1
            batch.append(event(tenant, f"{month}-{n % 28 + 1:02d}", f"0.{n * 7919 % 100000:05d}"))
        await store(pool, batch)
        stored.extend(batch)

    await add("2026-07", tenants)
    await close_month(pool, period="2026-07", now=NOW)
    for month in ("2026-08", "2026-09", "2026-10"):
        await add(month, tenants)
        await add("2026-07", tenants[:2])
        await run_rollup(pool, period=month)
        await add("2026-07", tenants[1:3])
        await close_month(pool, period=month, now=NOW)
    await add("2026-08", tenants[3:])
    await run_rollup(pool, period=NOW_MONTH)
    exact: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for e in stored:
        exact[(e["tenant_id"], e["occurred_at"][:7])] += Decimal(e["customer_charge_usd"])
    for tenant in tenants:
        expected = {
            month: usd_to_cents(total) for (t, month), total in exact.items() if t == tenant
        }
        assert await billed_cents(pool, tenant) == expected
    assert await marks(pool) == {(tenants[3], "2026-08")}, "only November's true-up is pending"


async def test_the_worker_role_writes_and_forgets_marks(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    """The usage consumer and the rollup log in with only `llm_usage_worker`."""
    url, pool = rollup_db
    name = f"worker_{uuid.uuid4().hex[:10]}"
    await pool.execute(f"CREATE ROLE {name} LOGIN IN ROLE llm_usage_worker")
    try:
        worker = await asyncpg.create_pool(url, user=name, min_size=1, max_size=2)
        assert worker is not None
        try:
            tenant = unique("tenant")
            await store(worker, [event(tenant, "2026-09-03", "1")])
            await close_month(worker, period="2026-09", now=NOW)
            await store(worker, [event(tenant, "2026-09-04", "1")])
            assert await marks(pool) == {(tenant, "2026-09")}
            await close_month(worker, period="2026-10", now=NOW)
            assert await marks(pool) == set()
            assert await billed_cents(pool, tenant) == {"2026-09": 200}
        finally:
            await worker.close()
    finally:
        await pool.execute(f"DROP OWNED BY {name}")
        await pool.execute(f"DROP ROLE {name}")


async def test_the_migration_marks_late_usage_stored_before_it(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    """What the old search on `updated_at` would find becomes marks: the migration's own
    statement, run on daily rows written before a close and after it."""
    _, pool = rollup_db
    migration = next(m for m in bundled_migrations() if m.version == "0010_late_marks")
    seed = migration.sql[migration.sql.index("INSERT INTO usage_late_marks") :]
    seed = seed[: seed.index(";") + 1]
    on_time, late, later = unique("tenant"), unique("tenant"), unique("tenant")
    await pool.execute(
        "INSERT INTO invoice_periods (period, closed_at) VALUES ('2026-09', '2026-10-03 00:00Z')"
    )
    for tenant, day, written in (
        (on_time, "2026-09-10", "2026-10-02 20:00Z"),  # before the close and its hour of margin
        (late, "2026-09-11", "2026-10-02 23:30Z"),  # within the margin: marked, to be safe
        (later, "2026-09-12", "2026-11-05 00:00Z"),
        (on_time, "2026-10-01", "2026-11-05 00:00Z"),  # an open month
    ):
        await pool.execute(
            "INSERT INTO usage_daily_totals (tenant_id, deployment_id, day, charge_usd, "
            "input_tokens, output_tokens, requests, updated_at) "
            "VALUES ($1, 'dep-1', $2::text::date, 1, 1, 1, 1, $3::text::timestamptz)",
            tenant,
            day,
            written,
        )
    await pool.execute(seed)
    assert await marks(pool) == {(late, "2026-09"), (later, "2026-09")}
