"""`llm-usage maintain`: the schema owner's scheduled upkeep of the storage (safe any time)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from llm_usage.cli.args import Commands
from llm_usage.cli.migrate import schema_owner_connection
from llm_usage.cli.stopping import until_sigterm

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings


def add_parser(commands: Commands) -> None:
    maintain = commands.add_parser(
        "maintain",
        help="create the event partitions ahead, prune the id window (run hourly, as the "
        "schema owner)",
    )
    maintain.set_defaults(run=run_maintain_command)


async def run_maintain_command(args: argparse.Namespace, settings: Settings) -> None:
    await until_sigterm(
        maintain_database(settings),
        stopped="maintain stopped by SIGTERM; every step it finished stays done: run it again",
    )


async def maintain_database(settings: Settings) -> None:
    from llm_usage.core.clock import worker_clock  # noqa: PLC0415 - when the command runs
    from llm_usage.storage.maintenance import maintain  # noqa: PLC0415

    async with schema_owner_connection(settings, "maintain") as connection:
        report = await maintain(
            connection,
            today=worker_clock()().date(),
            retention_months=settings.retention_months,
            window_hours=settings.dedup_window_hours,
        )
    for line in report.lines():
        print(line)
