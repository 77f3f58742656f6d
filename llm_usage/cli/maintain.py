"""`llm-usage maintain`: the schema owner's scheduled upkeep of the storage (safe any time)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from llm_usage.cli.args import Commands
from llm_usage.cli.migrate import schema_owner_connection
from llm_usage.cli.stopping import until_sigterm
from llm_usage.core.errors import PipelineError

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings


def add_parser(commands: Commands) -> None:
    maintain = commands.add_parser(
        "maintain",
        help="retire months past retention (archive, verify, drop), create the months ahead, "
        "prune the id window (run hourly, as the schema owner)",
    )
    maintain.set_defaults(run=run_maintain_command)


async def run_maintain_command(args: argparse.Namespace, settings: Settings) -> None:
    await until_sigterm(
        maintain_database(settings),
        stopped="maintain stopped by SIGTERM; every step it finished stays done: run it again",
    )


async def maintain_database(settings: Settings) -> None:
    """Under the schema owner's lock: create the months ahead, prune the id window and the
    budget periods past the horizon, then retire the months past retention (detach, archive,
    verify, drop). Exits 1, naming the differences, when
    an archive does not match its month (the month is then kept, detached)."""
    from llm_usage.archive.retention import retire_months  # noqa: PLC0415 - when it runs
    from llm_usage.archive.targets import archive_target  # noqa: PLC0415
    from llm_usage.core.clock import worker_clock  # noqa: PLC0415
    from llm_usage.storage.maintenance import maintain  # noqa: PLC0415
    from llm_usage.storage.migrate import lock_migrations, unlock_migrations  # noqa: PLC0415

    now = worker_clock()()
    today = now.date()
    async with schema_owner_connection(settings, "maintain") as connection:
        await lock_migrations(connection)
        try:
            # The months ahead first: an archive store out of reach must not stop them.
            report = await maintain(
                connection,
                now=now,
                retention_months=settings.retention_months,
                window_hours=settings.dedup_window_hours,
            )
            for line in report.lines():
                print(line, flush=True)
            retired = await retire_months(
                connection,
                today=today,
                retention_months=settings.retention_months,
                target=archive_target(settings),
            )
        finally:
            await unlock_migrations(connection)
    for month in retired:
        outcome = "archived, verified and dropped" if month.dropped else "KEPT (detached)"
        print(f"month {month.month:%Y-%m} past retention: {outcome}")
        for difference in month.report.differences:
            print(f"  {difference}")
    kept = [f"{m.month:%Y-%m}" for m in retired if not m.dropped]
    if kept:
        raise PipelineError(
            f"the archive of {', '.join(kept)} does not match the detached table; it is kept: "
            "see the differences above, then `llm-usage archive verify --period …`"
        )
