"""The monthly partitions of `llm_usage_events`: created ahead, read as the retention floor.

Creating and dropping partitions is DDL: only the schema owner (`llm-usage migrate` and
`llm-usage maintain`) does it; the workers only read `usage_event_months`.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from typing import NamedTuple

from llm_usage.domain.periods import add_months
from llm_usage.domain.retention import months_to_create, partition_name
from llm_usage.storage.flavour import citus_installed
from llm_usage.storage.pool import Connection
from llm_usage.storage.usage_dimensions import forget_days
from llm_usage.storage.usage_totals import lock_month_exclusively


class StoredMonths(NamedTuple):
    """The oldest and newest month with an attached partition (None: no partition at all)."""

    oldest: date | None
    newest: date | None


def _utc_midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


async def attached_months(connection: Connection) -> StoredMonths:
    """The retention floor (the oldest attached month; `date.min` for the legacy partition that
    holds everything before its cut-over) and the newest attached month."""
    row = await connection.fetchrow(
        """
        SELECT min(month) AS oldest, max(month) AS newest
        FROM usage_event_months WHERE state = 'attached'
        """
    )
    return StoredMonths(row["oldest"], row["newest"]) if row else StoredMonths(None, None)


async def is_partitioned(connection: Connection) -> bool:
    """True once migration 0009 made `llm_usage_events` a partitioned table."""
    partitioned = await connection.fetchval(
        "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass('llm_usage_events')"
    )
    return bool(partitioned)


async def create_partitions(
    connection: Connection, *, today: date, retention_months: int
) -> list[date]:
    """Create every missing month from the oldest kept through two past the current one; each
    month is created empty and then attached, which does not block the consumers' inserts (a
    `CREATE TABLE ... PARTITION OF` would). Returns the months created."""
    if not await is_partitioned(connection):
        return []
    rows = await connection.fetch("SELECT month, ends FROM usage_event_months")
    known = {row["month"] for row in rows}
    legacy_end = next((row["ends"] for row in rows if row["month"] == date.min), None)
    created = []
    for month in months_to_create(today, retention_months, known=known, covered_until=legacy_end):
        name = partition_name(month)
        async with connection.transaction():
            await connection.execute(
                f"CREATE TABLE {name} "
                "(LIKE llm_usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            )
            await connection.execute(
                f"ALTER TABLE llm_usage_events ATTACH PARTITION {name} FOR VALUES "
                f"FROM ({_literal(month)}) TO ({_literal(add_months(month, 1))})"
            )
            await connection.execute(
                "INSERT INTO usage_event_months (month, ends) VALUES ($1, $2)",
                month,
                add_months(month, 1),
            )
        created.append(month)
    return created


def _literal(day: date) -> str:
    """A UTC midnight as a SQL literal (DDL takes no parameters)."""
    return f"'{_utc_midnight(day).isoformat()}'"


async def set_month_state(connection: Connection, month: date, state: str) -> None:
    """Record where `month` is in its life (`usage_event_months.state`)."""
    await connection.execute(
        "UPDATE usage_event_months SET state = $2, changed_at = now() WHERE month = $1",
        month,
        state,
    )


async def month_states(connection: Connection) -> dict[date, str]:
    """Every month ever created and its state (the legacy partition is `date.min`)."""
    rows = await connection.fetch("SELECT month, state FROM usage_event_months")
    return {row["month"]: row["state"] for row in rows}


async def detach_partition(connection: Connection, month: date) -> None:
    """Take `month`'s partition out of `llm_usage_events` without blocking the consumers: mark
    the month `detaching` first (the retention floor moves past it, so new batches dead-letter
    its events `expired`), then `DETACH ... CONCURRENTLY`, which waits for the batches that may
    still write to it. A detach interrupted half-way is finished (`FINALIZE`). On Citus, which
    refuses CONCURRENTLY, a plain `DETACH`.

    The month's rows of the daily aggregate go with its partition, in the transactions that
    mark it `detaching` and `detached` (the second takes those of the batches that were still
    writing): a report never reads a retired month's whole days from the aggregate and its cut
    days from raw events that are gone."""
    name = partition_name(month)
    await _mark_retiring(connection, month, "detaching")
    pending = await connection.fetchval(
        "SELECT inhdetachpending FROM pg_inherits "
        "WHERE inhrelid = to_regclass($1) AND inhparent = 'llm_usage_events'::regclass",
        name,
    )
    if pending is True:
        await connection.execute(f"ALTER TABLE llm_usage_events DETACH PARTITION {name} FINALIZE")
    elif pending is False and await citus_installed(connection):
        # Citus refuses CONCURRENTLY: a plain DETACH, which holds an ACCESS EXCLUSIVE lock on
        # llm_usage_events for a moment (it waits for the batches in flight, and new ones wait
        # for it). It finishes or rolls back whole: no FINALIZE state to pick up.
        await connection.execute(f"ALTER TABLE llm_usage_events DETACH PARTITION {name}")
    elif pending is False:
        await connection.execute(
            f"ALTER TABLE llm_usage_events DETACH PARTITION {name} CONCURRENTLY"
        )
    await _mark_retiring(connection, month, "detached")


async def _mark_retiring(connection: Connection, month: date, state: str) -> None:
    """Record `state` for `month` and delete its days from the daily aggregate, at once.

    Under the month's lock, taken exclusively as the close of a month does: usage batches add
    to a month's aggregate rows only under that lock shared, so the delete waits for the
    batches writing the month (and they for it) instead of locking their rows in another order
    than theirs, which deadlocked."""
    async with connection.transaction():
        await lock_month_exclusively(connection, month)
        await forget_days(connection, month, add_months(month, 1))
        await set_month_state(connection, month, state)


async def drop_detached(connection: Connection, month: date) -> None:
    """Drop a detached month's table (its archive verified) and remember the month as dropped,
    so that it is never created again."""
    async with connection.transaction():
        await connection.execute(f"DROP TABLE IF EXISTS {partition_name(month)}")
        await set_month_state(connection, month, "dropped")
