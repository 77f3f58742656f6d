"""`llm-usage consume usage|budget`: run a consumer until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from llm_usage.cli.args import Commands, positive_seconds

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings


def add_parser(commands: Commands) -> None:
    consume = commands.add_parser("consume", help="run a consumer until SIGTERM/SIGINT")
    consume.add_argument("worker", choices=["usage", "budget"], help="which consumer to run")
    consume.add_argument(
        "--exit-when-idle",
        type=positive_seconds,
        metavar="SECONDS",
        help="stop once at the end of every held partition for this long",
    )
    consume.set_defaults(run=run_consume_command)


def run_consume_command(args: argparse.Namespace, settings: Settings) -> None:
    # Only the stack of the worker that runs is imported.
    from llm_usage.runtime.process import tune_collector_for_batches  # noqa: PLC0415

    if args.worker == "budget":
        from llm_usage.consumers.budget.consumer import (  # noqa: PLC0415
            run_budget_consumer as run_consumer,
        )
    else:
        from llm_usage.consumers.usage.consumer import (  # noqa: PLC0415
            run_usage_consumer as run_consumer,
        )
    # Once start-up's objects exist, before the loop starts: they are frozen out of collections.
    tune_collector_for_batches()
    asyncio.run(run_consumer(settings, exit_when_idle=args.exit_when_idle))
