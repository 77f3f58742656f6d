"""`llm-usage migrate`: apply the SQL migrations (safe twice, safe concurrently)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from llm_usage.cli.args import Commands
from llm_usage.cli.stopping import until_sigterm
from llm_usage.core.errors import UserFacingError

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings


def add_parser(commands: Commands) -> None:
    migrate = commands.add_parser("migrate", help="apply database migrations (safe to run twice)")
    migrate.set_defaults(run=run_migrate_command)


async def run_migrate_command(args: argparse.Namespace, settings: Settings) -> None:
    await until_sigterm(
        migrate_database(settings),
        stopped="migrate stopped by SIGTERM before it finished; the migrations apply in one "
        "transaction, so none of this run's was applied: run it again",
    )


async def migrate_database(settings: Settings) -> None:
    """Apply what is missing and say which migrations that was; a user who may not change the
    schema is one line."""
    import asyncpg  # noqa: PLC0415 - the database stack, when the command runs

    from llm_usage.storage.migrate import migrate  # noqa: PLC0415
    from llm_usage.storage.pool import create_pool  # noqa: PLC0415

    pool = await create_pool(settings.database_url, size=1)
    try:
        async with pool.acquire() as connection:
            applied = await migrate(connection)
    except asyncpg.exceptions.InsufficientPrivilegeError as error:
        raise UserFacingError(
            f"the database user may not change the schema ({error}); "
            "run `llm-usage migrate` as the schema owner"
        ) from None
    finally:
        await pool.close()
    print(f"applied {', '.join(applied)}" if applied else "database is up to date")
