"""`llm-usage dev up|down|env`: the local Kafka and PostgreSQL of `llm_usage/local/dev.py`."""

from __future__ import annotations

import argparse
import asyncio

from llm_usage.cli.args import Commands, positive_int
from llm_usage.cli.migrate import migrate_database
from llm_usage.cli.topics import ensure_pipeline_topics


def add_parser(commands: Commands) -> None:
    dev = commands.add_parser("dev", help="a local Kafka and PostgreSQL for development")
    dev.set_defaults(local=True)
    dev_commands = dev.add_subparsers(dest="dev_command", required=True)
    up = dev_commands.add_parser("up", help="start them (idempotent), create topics, migrate")
    up.add_argument(
        "--kafka-port",
        type=positive_int,
        help="a fixed port for Kafka (fails if taken); default: 9092 if free, else free ports",
    )
    up.add_argument(
        "--nodes", type=int, choices=[1, 3], default=1, help="brokers (3: a cluster on one host)"
    )
    up.add_argument("--partitions", type=positive_int, default=6)
    up.add_argument(
        "--citus",
        action="store_true",
        help="a Citus coordinator and two workers instead of one PostgreSQL (built once, cached)",
    )
    up.set_defaults(run=run_dev_up)
    dev_commands.add_parser("down", help="stop them").set_defaults(run=run_dev_down)
    dev_commands.add_parser("env", help="print the export lines that reach them").set_defaults(
        run=run_dev_env
    )


def run_dev_up(args: argparse.Namespace) -> None:
    from llm_usage.core.settings import load_settings  # noqa: PLC0415 - when the command runs
    from llm_usage.local.dev import dev_up  # noqa: PLC0415

    environment = dev_up(kafka_port=args.kafka_port, nodes=args.nodes, citus=args.citus)
    settings = load_settings(
        kafka_bootstrap_servers=environment.kafka_bootstrap_servers,
        database_url=environment.database_url,
    )
    asyncio.run(migrate_database(settings))
    asyncio.run(
        ensure_pipeline_topics(settings, partitions=args.partitions, replication_factor=None)
    )
    database = "Citus" if args.citus else "PostgreSQL"
    print(f"local Kafka and {database} are up; to reach them:")
    print(environment.export_lines())
    print('eval "$(llm-usage dev env)"   # in your shell, then e.g. llm-usage consume usage')


def run_dev_down(args: argparse.Namespace) -> None:
    from llm_usage.local.dev import dev_down  # noqa: PLC0415 - when the command runs

    dev_down()
    print("local Kafka and PostgreSQL are stopped")


def run_dev_env(args: argparse.Namespace) -> None:
    from llm_usage.local.dev import dev_env  # noqa: PLC0415 - when the command runs

    print(dev_env().export_lines())
