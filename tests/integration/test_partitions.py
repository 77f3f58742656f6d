"""Monthly partitions from `migrate` and `maintain`, the id window pruned, and a database of the
previous release moved onto the partitioned table with every event still exactly once."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from llm_usage.archive.export import archive_table
from llm_usage.archive.restore import restore_month
from llm_usage.archive.retention import retire_months
from llm_usage.archive.targets import local_target
from llm_usage.consumers.budget.handler import BudgetCounter
from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.domain.periods import add_months
from llm_usage.domain.retention import MONTHS_AHEAD, oldest_kept_month
from llm_usage.runtime.handler import BatchResult
from llm_usage.storage.maintenance import maintain
from llm_usage.storage.migrate import migrate
from tests import clock
from tests.integration.pipeline import encode, unique, usage_event
from tests.records import consumer_record


async def months(connection: asyncpg.Connection) -> list[date]:
    rows = await connection.fetch(
        "SELECT month FROM usage_event_months WHERE state = 'attached' ORDER BY month"
    )
    return [row["month"] for row in rows]


async def test_migrate_creates_every_kept_month_and_two_ahead_and_no_default(
    empty_database_url: str,
) -> None:
    connection = await asyncpg.connect(empty_database_url)
    try:
        await migrate(connection, retention_months=3)
        today = clock.today()
        expected = [add_months(oldest_kept_month(today, 3), n) for n in range(3 + 1 + MONTHS_AHEAD)]
        assert await months(connection) == expected
        partitions = await connection.fetch(
            """
            SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'llm_usage_events'::regclass ORDER BY c.relname
            """
        )
        assert [p["relname"] for p in partitions] == [
            f"llm_usage_events_{m:%Y_%m}" for m in expected
        ]
        assert not any("DEFAULT" in p["bound"] for p in partitions)
        # Each month's bounds are its UTC midnights.
        first = partitions[0]["bound"]
        assert f"'{expected[0]:%Y-%m-%d} 00:00:00+00'" in first, first
        # An event past the newest month has nowhere to go: the database refuses it.
        beyond = datetime.combine(add_months(expected[-1], 1), time(), tzinfo=UTC)
        with pytest.raises(asyncpg.exceptions.CheckViolationError, match="no partition"):
            await connection.execute(
                "INSERT INTO llm_usage_events (gateway_request_id, tenant_id, input_tokens, "
                "output_tokens, cached_input_tokens, reasoning_tokens, total_tokens, "
                "customer_charge_usd, occurred_at) VALUES ('x', 't', 0, 0, 0, 0, 0, 0, $1)",
                beyond,
            )
    finally:
        await connection.close()


async def test_maintain_creates_a_missing_month_and_prunes_the_window(
    empty_database_url: str,
) -> None:
    connection = await asyncpg.connect(empty_database_url)
    try:
        await migrate(connection, retention_months=1)
        newest = (await months(connection))[-1]
        # The newest month as if it had never been created.
        await connection.execute(f"DROP TABLE llm_usage_events_{newest:%Y_%m}")
        await connection.execute("DELETE FROM usage_event_months WHERE month = $1", newest)
        old, recent = unique("req"), unique("req")
        for request_id, seen in ((old, timedelta(hours=200)), (recent, timedelta(hours=1))):
            await connection.execute(
                "INSERT INTO usage_event_ids (gateway_request_id, tenant_id, input_tokens, "
                "output_tokens, cached_input_tokens, reasoning_tokens, total_tokens, "
                "customer_charge_usd, occurred_at, first_seen_at) "
                "VALUES ($1, 't', 0, 0, 0, 0, 0, 0, now(), now() - $2::interval)",
                request_id,
                seen,
            )

        report = await maintain(connection, now=clock.now(), retention_months=1, window_hours=192)

        assert report.months_created == [newest]
        assert (await months(connection))[-1] == newest
        assert report.window_ids_pruned == 1
        left = {
            r[0] for r in await connection.fetch("SELECT gateway_request_id FROM usage_event_ids")
        }
        assert left == {recent}
        again = await maintain(connection, now=clock.now(), retention_months=1, window_hours=192)
        assert again.months_created == []
        assert again.window_ids_pruned == 0
    finally:
        await connection.close()


# The previous release's write, as it was (3206f9e, storage/usage_events.py): look the ids up in
# the primary key, COPY the new rows; its budget consumer remembered the ids it counted.
_PREVIOUS_LOOK_UP = (
    "SELECT gateway_request_id FROM llm_usage_events WHERE gateway_request_id = ANY($1)"
)
_PREVIOUS_COLUMNS = (
    "gateway_request_id", "tenant_id", "deployment_id", "input_tokens", "output_tokens",
    "cached_input_tokens", "reasoning_tokens", "total_tokens", "customer_charge_usd",
    "occurred_at",
)  # fmt: skip


async def write_as_the_previous_release(
    connection: asyncpg.Connection, events: list[dict[str, Any]], *, counted: bool
) -> None:
    async with connection.transaction():
        ids = [e["gateway_request_id"] for e in events]
        known = {r[0] for r in await connection.fetch(_PREVIOUS_LOOK_UP, ids)}
        rows = [
            (
                e["gateway_request_id"],
                e["tenant_id"],
                e["deployment_id"],
                e["input_tokens"],
                e["output_tokens"],
                0,
                0,
                e["input_tokens"] + e["output_tokens"],
                Decimal(e["customer_charge_usd"]),
                datetime.fromisoformat(e["occurred_at"]),
            )
            for e in events
            if e["gateway_request_id"] not in known
        ]
        await connection.copy_records_to_table(
            "llm_usage_events", records=rows, columns=list(_PREVIOUS_COLUMNS)
        )
        if counted:
            await connection.executemany(
                "INSERT INTO budget_counted_events (gateway_request_id) VALUES ($1)",
                [(i,) for i in ids],
            )


async def test_a_database_of_the_previous_release_is_migrated_while_it_writes(
    empty_database_url: str,
) -> None:
    """The online step (0008) runs while the previous release keeps storing and counting; then,
    its writers stopped, the rest (0009, a brief lock). Every event stored before, during and
    after stays exactly once: re-sends are duplicates, changed copies conflicts (the window
    knows the ids stored during 0008 too), and the budget counts what it had not counted."""
    connection = await asyncpg.connect(empty_database_url)
    writer = await asyncpg.connect(empty_database_url)
    try:
        await migrate(connection, until="0007")
        tenant = unique("tenant")
        history = [usage_event(tenant) for _ in range(20_000)]
        for start in range(0, len(history), 5_000):
            await write_as_the_previous_release(
                writer, history[start : start + 5_000], counted=True
            )
        during: list[dict[str, Any]] = []
        uncounted: list[dict[str, Any]] = []  # stored by its usage consumer, not yet counted

        async def keep_writing(stop: asyncio.Event) -> None:
            while not stop.is_set():
                batch = [usage_event(tenant) for _ in range(50)]
                await write_as_the_previous_release(writer, batch[:40], counted=True)
                await write_as_the_previous_release(writer, batch[40:], counted=False)
                during.extend(batch[:40])
                uncounted.extend(batch[40:])
                await asyncio.sleep(0.01)

        stop = asyncio.Event()
        writing = asyncio.create_task(keep_writing(stop))
        try:
            assert await migrate(connection, until="0008") == ["0008_event_identity"]
        finally:
            stop.set()
            await writing
        assert during, "the previous release wrote while 0008 ran"
        applied = await migrate(connection)
        assert applied[:1] == ["0009_partitioned_events"]
        legacy = await connection.fetchval(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class "
            "WHERE relname = 'llm_usage_events_legacy'"
        )
        assert legacy is not None
        assert legacy.startswith("FOR VALUES FROM (MINVALUE)"), legacy

        stored = [*history, *during, *uncounted]
        changed = [
            {**e, "customer_charge_usd": "0.0099", "customer_charge_cents": 1}
            for e in (history[0], during[0], during[-1], uncounted[-1])
        ]
        new = usage_event(tenant)
        backlog = [*stored, *changed, new, new]
        records = [consumer_record(encode(e), offset=n) for n, e in enumerate(backlog)]
        pool = await asyncpg.create_pool(empty_database_url, min_size=1, max_size=2)
        assert pool is not None
        try:
            usage = await UsageRecorder(pool=pool, clock=clock.now).record_batch(records)
            budget = await BudgetCounter(pool=pool, clock=clock.now).record_batch(records)
        finally:
            await pool.close()

        assert usage.counts == {
            "recorded": 1,
            "duplicate": len(stored) + 1,
            "conflict": len(changed),
        }, usage
        assert len(usage.dead_letters) == len(changed)
        # Counted now: what the previous release stored but had not counted, and the new one.
        assert budget.counts[BatchResult.RECORDED] == len(uncounted) + 1, budget
        count = await connection.fetchval(
            "SELECT count(*) FROM llm_usage_events WHERE tenant_id = $1", tenant
        )
        assert count == len(stored) + 1
        spend = await connection.fetchval(
            "SELECT spend_usd FROM budget_spend WHERE tenant_id = $1 AND scope_type = 'tenant' "
            "AND \"window\" = 'monthly'",
            tenant,
        )
        assert spend == Decimal("0.0054") * (len(uncounted) + 1)
    finally:
        await writer.close()
        await connection.close()


async def store_events_in(
    database_url: str, month: date, count: int, *, at: datetime | None = None
) -> str:
    """`count` events of a new tenant on the month's first day (or `at`), stored by the usage
    consumer's handler; returns the tenant."""
    tenant = unique("tenant")
    occurred = (at or datetime.combine(month, time(9), tzinfo=UTC)).isoformat()
    records = [
        consumer_record(encode(usage_event(tenant, occurred_at=occurred)), offset=n)
        for n in range(count)
    ]
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    assert pool is not None
    try:
        outcome = await UsageRecorder(pool=pool, clock=clock.now).record_batch(records)
    finally:
        await pool.close()
    assert outcome.counts in ({"recorded": count}, {"dead_lettered": count}), outcome
    return tenant


async def test_a_month_past_retention_is_archived_verified_dropped_and_then_expired(
    empty_database_url: str, tmp_path: Path
) -> None:
    connection = await asyncpg.connect(empty_database_url)
    target = local_target(tmp_path)
    try:
        await migrate(connection, retention_months=1)
        oldest = (await months(connection))[0]
        tenant = await store_events_in(empty_database_url, oldest, 40)
        kept = await store_events_in(
            empty_database_url, clock.this_month(), 3, at=clock.earlier_today()
        )
        aggregate = "SELECT count(*) FROM usage_daily_dimensions WHERE tenant_id = $1"
        assert await connection.fetchval(aggregate, tenant) > 0
        kept_rows = await connection.fetch(
            "SELECT * FROM usage_daily_dimensions WHERE tenant_id = $1 ORDER BY dimension, key",
            kept,
        )
        assert len(kept_rows) == 7  # one value of each dimension, one day
        a_month_later = add_months(clock.today().replace(day=1), 1)

        [retired] = await retire_months(
            connection, today=a_month_later, retention_months=1, target=target
        )

        # The retired month's aggregate went with its events; the kept month's is untouched.
        assert await connection.fetchval(aggregate, tenant) == 0
        assert (
            await connection.fetch(
                "SELECT * FROM usage_daily_dimensions WHERE tenant_id = $1 ORDER BY dimension, key",
                kept,
            )
            == kept_rows
        )
        assert retired.month == oldest
        assert retired.dropped, retired.report.differences
        assert retired.report.rows == 40
        states = await connection.fetch("SELECT month, state FROM usage_event_months")
        assert {r["month"]: r["state"] for r in states}[oldest] == "dropped"
        assert (
            await connection.fetchval("SELECT to_regclass($1)", f"llm_usage_events_{oldest:%Y_%m}")
            is None
        )
        assert (await months(connection))[0] == add_months(oldest, 1), "the floor moved"
        # Brought back for an audit, equal to what was stored, beside the live table.
        assert await restore_month(connection, target, oldest) == 40
        restored = await connection.fetchval(
            f"SELECT sum(customer_charge_usd) FROM restored_usage_events_{oldest:%Y_%m} "
            "WHERE tenant_id = $1",
            tenant,
        )
        assert restored == Decimal("0.0054") * 40
        # A late event of the dropped month is expired, never a stalled partition.
        await store_events_in(empty_database_url, oldest, 1)
        assert await connection.fetchval("SELECT count(*) FROM llm_usage_events") == 3  # kept
        # Nothing is left to do, and the dropped month is never created again.
        assert (
            await retire_months(connection, today=a_month_later, retention_months=1, target=target)
            == []
        )
        await maintain(
            connection,
            now=datetime.combine(a_month_later, time(), tzinfo=UTC),
            retention_months=1,
            window_hours=192,
        )
        assert oldest not in await months(connection)
    finally:
        await connection.close()


async def test_an_archive_that_does_not_match_keeps_the_month_detached(
    empty_database_url: str, tmp_path: Path
) -> None:
    connection = await asyncpg.connect(empty_database_url)
    target = local_target(tmp_path)
    try:
        await migrate(connection, retention_months=1)
        oldest = (await months(connection))[0]
        await store_events_in(empty_database_url, oldest, 5)
        # An archive written earlier, before one more event arrived: it no longer matches.
        await archive_table(
            connection, table=f"llm_usage_events_{oldest:%Y_%m}", month=oldest, target=target
        )
        await store_events_in(empty_database_url, oldest, 1)

        [retired] = await retire_months(
            connection,
            today=add_months(clock.today().replace(day=1), 1),
            retention_months=1,
            target=target,
        )

        assert not retired.dropped
        assert retired.report.differences
        state = await connection.fetchval(
            "SELECT state FROM usage_event_months WHERE month = $1", oldest
        )
        assert state == "detached"
        kept = await connection.fetchval(f"SELECT count(*) FROM llm_usage_events_{oldest:%Y_%m}")
        assert kept == 6, "the detached table is kept whole"
    finally:
        await connection.close()
