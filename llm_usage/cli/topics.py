"""`llm-usage topics ensure`: create the pipeline's missing topics, grow small ones."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from llm_usage.cli.args import Commands, positive_int
from llm_usage.cli.stopping import until_sigterm

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings


def add_parser(commands: Commands) -> None:
    topics = commands.add_parser("topics", help="manage the pipeline's Kafka topics")
    topics_commands = topics.add_subparsers(dest="topics_command", required=True)
    ensure = topics_commands.add_parser("ensure", help="create missing topics, grow small ones")
    ensure.add_argument("--partitions", type=positive_int, default=6)
    ensure.add_argument(
        "--replication-factor",
        type=positive_int,
        help="default: min(3, number of brokers)",
    )
    ensure.set_defaults(run=run_topics_ensure_command)


async def run_topics_ensure_command(args: argparse.Namespace, settings: Settings) -> None:
    await until_sigterm(
        ensure_pipeline_topics(
            settings, partitions=args.partitions, replication_factor=args.replication_factor
        ),
        stopped="topics ensure stopped by SIGTERM before it finished; the topics it printed "
        "are in place, run it again for the rest",
    )


async def ensure_pipeline_topics(
    settings: Settings, *, partitions: int, replication_factor: int | None
) -> None:
    """Create or grow the usage, DLQ and alerts topics, printing each one's state."""
    from llm_usage.kafka.topics import ensure_topics, pipeline_topics  # noqa: PLC0415

    states = await ensure_topics(
        settings,
        pipeline_topics(settings),
        partitions=partitions,
        replication_factor=replication_factor,
    )
    for state in states:
        verb = "created" if state.created else "exists"
        print(f"{state.name}: {verb}, {state.partitions} partitions")
