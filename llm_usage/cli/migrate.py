"""`llm-usage migrate`: apply the SQL migrations (safe twice, safe concurrently)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from llm_usage.cli.args import Commands
from llm_usage.cli.stopping import until_sigterm
from llm_usage.core.errors import UserFacingError

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings
    from llm_usage.storage.pool import Connection


def add_parser(commands: Commands) -> None:
    migrate = commands.add_parser("migrate", help="apply database migrations (safe to run twice)")
    migrate.add_argument(
        "--until",
        metavar="VERSION",
        help="stop after this migration (e.g. 0008: the part that runs online while the "
        "previous release still writes; see docs/storage.md)",
    )
    migrate.set_defaults(run=run_migrate_command)


async def run_migrate_command(args: argparse.Namespace, settings: Settings) -> None:
    await until_sigterm(
        migrate_database(settings, until=args.until),
        stopped="migrate stopped by SIGTERM before it finished; every migration is safe to "
        "run again: run it again to apply the rest",
    )


@asynccontextmanager
async def schema_owner_connection(settings: Settings, command: str) -> AsyncIterator[Connection]:
    """One connection for a command only the schema owner may run; a user who may not change
    the schema, or a database never migrated, is one line."""
    import asyncpg  # noqa: PLC0415 - the database stack, when the command runs

    from llm_usage.storage.pool import create_pool  # noqa: PLC0415

    pool = await create_pool(settings.database_url, size=1)
    try:
        async with pool.acquire() as connection:
            yield connection
    except asyncpg.exceptions.InsufficientPrivilegeError as error:
        raise UserFacingError(
            f"the database user may not change the schema ({error}); "
            f"run `llm-usage {command}` as the schema owner"
        ) from None
    except asyncpg.exceptions.UndefinedTableError as error:
        raise UserFacingError(f"{error}; run `llm-usage migrate` first") from None
    finally:
        await pool.close()


async def migrate_database(settings: Settings, *, until: str | None = None) -> None:
    """Apply what is missing and say which migrations that was. On Citus (the `citus` extension
    installed), once every migration is applied, distribute the tables not distributed yet
    (storage/distribution.py)."""
    from llm_usage.core.clock import worker_clock  # noqa: PLC0415 - when the command runs
    from llm_usage.storage.distribution import distribute  # noqa: PLC0415
    from llm_usage.storage.flavour import citus_installed  # noqa: PLC0415
    from llm_usage.storage.migrate import migrate  # noqa: PLC0415

    async with schema_owner_connection(settings, "migrate") as connection:
        applied = await migrate(
            connection,
            today=worker_clock()().date(),
            dedup_window_hours=settings.dedup_window_hours,
            retention_months=settings.retention_months,
            until=until,
        )
        distributed = (
            await distribute(connection)
            if until is None and await citus_installed(connection)
            else []
        )
    print(f"applied {', '.join(applied)}" if applied else "database is up to date")
    if distributed:
        print(f"distributed {', '.join(distributed)}")
