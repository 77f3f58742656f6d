"""Plain-SQL migrations applied in file-name order, once each, safe from several processes.

A migration runs in one transaction, unless its first line is `-- migrate: outside a
transaction`: then each statement commits on its own (what `CREATE INDEX CONCURRENTLY` and a
long validation on a live table need), and every statement must be safe to run again.
After the migrations, the monthly partitions of `llm_usage_events` are created up to the months
ahead (storage/partitions.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import date
from importlib import resources

from llm_usage.storage.partitions import create_partitions
from llm_usage.storage.pool import Connection

# Any constant works; it only has to be the same in every process that migrates this database.
MIGRATION_LOCK_KEY = 0x6C6C6D5F75736167  # "llm_usag"
OUTSIDE_TRANSACTION = "-- migrate: outside a transaction"
DEFAULT_DEDUP_WINDOW_HOURS = 192
DEFAULT_RETENTION_MONTHS = 25


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str

    @property
    def in_transaction(self) -> bool:
        return not self.sql.startswith(OUTSIDE_TRANSACTION)

    def statements(self) -> list[str]:
        """The file's statements one by one: `;` at the end of a line ends one, except inside a
        `$$`-quoted body."""
        statements: list[str] = []
        current: list[str] = []
        in_body = False
        for line in self.sql.splitlines():
            if line.lstrip().startswith("--") and not current:
                continue
            current.append(line)
            if line.count("$$") % 2:
                in_body = not in_body
            if not in_body and line.rstrip().endswith(";"):
                statements.append("\n".join(current))
                current = []
        if "".join(current).strip():
            statements.append("\n".join(current))
        return statements


def bundled_migrations() -> list[Migration]:
    """The `storage/migrations/*.sql` files shipped with the package, in the order to apply them."""
    folder = resources.files("llm_usage.storage") / "migrations"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return [Migration(version=f.name.removesuffix(".sql"), sql=f.read_text("utf-8")) for f in files]


async def migrate(
    connection: Connection,
    *,
    today: date | None = None,
    dedup_window_hours: int = DEFAULT_DEDUP_WINDOW_HOURS,
    retention_months: int = DEFAULT_RETENTION_MONTHS,
    until: str | None = None,
) -> list[str]:
    """Apply the migrations this database has not seen, then create the partitions missing up to
    the months ahead of `today` (the worker clock's day when not given); return the versions
    applied now. With `until`, stop after the migration whose version starts with it (an
    upgrade in two steps: the online part while the previous release runs, then the rest).

    A session advisory lock serialises concurrent migrators: the second one waits, then finds
    everything applied and does nothing.
    """
    if today is None:
        from llm_usage.core.clock import worker_clock  # noqa: PLC0415 - only when not given

        today = worker_clock()().date()
    applied_now: list[str] = []
    await lock_migrations(connection)
    try:
        # What the SQL of a migration may need to know of the migrating worker.
        await connection.execute(
            "SELECT set_config('llm_usage.dedup_window_hours', $1, false), "
            "set_config('llm_usage.today', $2, false)",
            str(dedup_window_hours),
            today.isoformat(),
        )
        await connection.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    text PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {
            row["version"]
            for row in await connection.fetch("SELECT version FROM schema_migrations")
        }
        for migration in bundled_migrations():
            if migration.version in done:
                if until is not None and migration.version.startswith(until):
                    return applied_now
                continue
            if migration.in_transaction:
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await _record(connection, migration)
            else:
                for statement in migration.statements():
                    await connection.execute(statement)
                await _record(connection, migration)
            applied_now.append(migration.version)
            if until is not None and migration.version.startswith(until):
                return applied_now
        await create_partitions(connection, today=today, retention_months=retention_months)
    finally:
        await unlock_migrations(connection)
    return applied_now


async def lock_migrations(connection: Connection) -> None:
    """Take the schema owner's lock (migrations, maintenance) for this session, waiting without
    holding a snapshot meanwhile: a migrator building an index CONCURRENTLY waits for every open
    snapshot, so one waiting inside a statement for the lock would deadlock with it."""
    while not await connection.fetchval(  # noqa: ASYNC110 - the lock lives in PostgreSQL
        "SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY
    ):
        await asyncio.sleep(0.1)


async def unlock_migrations(connection: Connection) -> None:
    await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _record(connection: Connection, migration: Migration) -> None:
    await connection.execute(
        "INSERT INTO schema_migrations (version) VALUES ($1)", migration.version
    )
