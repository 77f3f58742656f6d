"""Plain-SQL migrations applied in file-name order, once each, safe from several processes."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from llm_usage.storage.pool import Connection

# Any constant works; it only has to be the same in every process that migrates this database.
_MIGRATION_LOCK_KEY = 0x6C6C6D5F75736167  # "llm_usag"


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str


def bundled_migrations() -> list[Migration]:
    """The `storage/migrations/*.sql` files shipped with the package, in the order to apply them."""
    folder = resources.files("llm_usage.storage") / "migrations"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return [Migration(version=f.name.removesuffix(".sql"), sql=f.read_text("utf-8")) for f in files]


async def migrate(connection: Connection) -> list[str]:
    """Apply the migrations this database has not seen; return the versions applied now.

    A transaction-level advisory lock serialises concurrent migrators: the second one waits,
    then finds everything applied and does nothing.
    """
    applied_now: list[str] = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
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
                continue
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)", migration.version
            )
            applied_now.append(migration.version)
    return applied_now
