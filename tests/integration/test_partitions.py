"""Monthly partitions from `migrate` and `maintain`, the id window pruned, and a database of the
previous release moved onto the partitioned table with every event still exactly once."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path

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
from llm_usage.storage.maintenance import maintain
from llm_usage.storage.migrate import bundled_migrations, migrate
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


async def test_a_database_of_the_previous_release_keeps_every_event_exactly_once(
    empty_database_url: str,
) -> None:
    """Events stored and counted by the previous release (no window, a primary key on the id)
    become the legacy partition; their re-sends are duplicates, new events are stored and
    counted once, and an id the budget consumer counted before the upgrade is not counted
    again."""
    connection = await asyncpg.connect(empty_database_url)
    try:
        await connection.execute(
            "CREATE TABLE schema_migrations (version text PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in bundled_migrations():
            if migration.version >= "0008":
                break
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)", migration.version
            )
        tenant = unique("tenant")
        stored_before = [usage_event(tenant) for _ in range(3)]
        counted_only = usage_event(tenant)  # counted by the budget consumer, not yet stored
        for event in stored_before:
            await connection.execute(
                "INSERT INTO llm_usage_events (gateway_request_id, tenant_id, deployment_id, "
                "input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, "
                "total_tokens, customer_charge_usd, occurred_at) "
                "VALUES ($1, $2, $3, $4, $5, 0, 0, $6, $7, $8)",
                event["gateway_request_id"],
                tenant,
                event["deployment_id"],
                event["input_tokens"],
                event["output_tokens"],
                event["input_tokens"] + event["output_tokens"],
                Decimal(event["customer_charge_usd"]),
                datetime.fromisoformat(event["occurred_at"]),
            )
        await connection.executemany(
            "INSERT INTO budget_counted_events (gateway_request_id) VALUES ($1)",
            [(e["gateway_request_id"],) for e in [*stored_before[:2], counted_only]],
        )

        applied = await migrate(connection)
        assert applied[:2] == ["0008_event_identity", "0009_partitioned_events"]
        legacy = await connection.fetchval(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class "
            "WHERE relname = 'llm_usage_events_legacy'"
        )
        assert legacy is not None
        assert legacy.startswith("FOR VALUES FROM (MINVALUE)"), legacy
        assert await connection.fetchval("SELECT count(*) FROM usage_event_ids") == 3

        new = usage_event(tenant)
        records = [
            consumer_record(encode(event), offset=n)
            for n, event in enumerate([*stored_before, counted_only, new, new])
        ]
        pool = await asyncpg.create_pool(empty_database_url, min_size=1, max_size=2)
        assert pool is not None
        try:
            usage = await UsageRecorder(pool=pool, clock=clock.now).record_batch(records)
            budget = await BudgetCounter(pool=pool, clock=clock.now).record_batch(records)
        finally:
            await pool.close()

        assert usage.counts == {"recorded": 2, "duplicate": 4}, usage
        # Counted now: the third stored event (never counted before) and the new one.
        assert budget.counts == {"recorded": 2, "duplicate": 4}, budget
        stored = await connection.fetchval(
            "SELECT count(*) FROM llm_usage_events WHERE tenant_id = $1", tenant
        )
        assert stored == 5
        spend = await connection.fetchval(
            "SELECT spend_usd FROM budget_spend WHERE tenant_id = $1 AND scope_type = 'tenant' "
            "AND \"window\" = 'monthly'",
            tenant,
        )
        assert spend == Decimal("0.0054") * 2
    finally:
        await connection.close()


async def store_events_in(database_url: str, month: date, count: int) -> str:
    """`count` events of a new tenant on the month's first day, stored by the usage consumer's
    handler; returns the tenant."""
    tenant = unique("tenant")
    occurred = datetime.combine(month, time(9), tzinfo=UTC).isoformat()
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
        a_month_later = add_months(clock.today().replace(day=1), 1)

        [retired] = await retire_months(
            connection, today=a_month_later, retention_months=1, target=target
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
        assert await connection.fetchval("SELECT count(*) FROM llm_usage_events") == 0
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
