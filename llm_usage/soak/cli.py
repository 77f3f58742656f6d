"""`llm-usage soak`: its arguments; the soak itself is imported when it runs."""

from __future__ import annotations

import argparse
import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from llm_usage.cli.args import Commands, number_of_seconds, whole_number
from llm_usage.core.errors import PipelineError

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings


def _seconds(text: str) -> float:
    value = number_of_seconds(text)
    if value < 60:
        raise argparse.ArgumentTypeError("a soak needs at least 60 s of load to cross a month end")
    return value


def _rate(text: str) -> int:
    value = whole_number(text)
    if value < 10:
        raise argparse.ArgumentTypeError("must be at least 10 events/s")
    return value


def add_parser(commands: Commands) -> None:
    soak = commands.add_parser(
        "soak",
        help="the whole pipeline on 3 brokers with replicas, a gateway load and faults; checked",
        description=(
            "Starts its own 3-broker Kafka cluster and PostgreSQL, two replicas of each worker, "
            "publishes a gateway-like load while a seeded schedule of faults runs, drains, then "
            "checks every event, counter, alert and invoice line with exact arithmetic and "
            "writes a report (report.md, soak.png). Exit 0 only if every check passed."
        ),
    )
    soak.add_argument(
        "--seed", type=int, help="replays a run's load and faults exactly (default: a new one)"
    )
    soak.add_argument("--seconds", type=_seconds, default=1200.0, help="seconds of load")
    soak.add_argument("--rate", type=_rate, default=2000, help="events/s")
    soak.add_argument(
        "--report-dir", type=Path, default=Path("soak-report"), help="where the report goes"
    )
    soak.add_argument(
        "--keep-data", action="store_true", help="keep the run's Kafka and PostgreSQL data"
    )
    soak.set_defaults(run=run_soak_command)


class SoakFailedError(PipelineError):
    """A check failed: the report says which."""


async def run_soak_command(args: argparse.Namespace, settings: Settings) -> None:
    del settings  # the soak starts its own services; nothing of the environment's is used
    from llm_usage.core.logs import configure_logging  # noqa: PLC0415 - when the soak runs

    # The soak prints its own progress; clients' reconnect noise during faults goes nowhere.
    configure_logging(log_format="console", level="WARNING")
    for noisy in ("aiokafka", "asyncpg"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    from llm_usage.soak.run import SoakOptions, run_soak  # noqa: PLC0415 - heavy, soak only

    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    passed = await run_soak(
        SoakOptions(
            seed=seed,
            seconds=args.seconds,
            rate=args.rate,
            report_dir=args.report_dir,
            keep_data=args.keep_data,
        )
    )
    if not passed:
        raise SoakFailedError(f"a check failed; see {args.report_dir / 'report.md'}")
