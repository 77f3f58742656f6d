"""`llm-usage reconcile`: every stored number derived from events checked against the events.

One line per drift (or, with --json, one object a line), then a summary. Exit 0 when there is
none, 1 when there is any, 2 when it could not run (one line: what and why).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Final, TextIO

from llm_usage.cli.args import Commands, checked_period, checked_tenant, number_of_seconds
from llm_usage.core.clock import worker_clock
from llm_usage.core.errors import (
    ConfigurationError,
    PipelineError,
    ServiceUnreachableError,
    TransientError,
)
from llm_usage.domain.periods import current_period

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings
    from llm_usage.rollup.reconcile import ReconcileReport


# How long a lagging candidate is given before it is read again (the demo uses it too).
DEFAULT_CONFIRM_SECONDS: Final = 5.0


class DriftFoundError(PipelineError):
    """Reconcile found drift (each already printed): exit 1."""


def add_parser(commands: Commands) -> None:
    parser = commands.add_parser(
        "reconcile",
        help="check aggregates, budget counters, invoices and alerts against the events",
        description=(
            "Recompute a month's aggregates, budget counters, closed-month invoice totals, "
            "alerts and holds from the stored events, compare them with what is stored, and "
            "print every difference (exit 1 if any). Differences another worker may still be "
            "catching up on are reported only if a second read after --confirm-seconds finds "
            "them again."
        ),
    )
    parser.add_argument("--period", metavar="YYYY-MM", help="the month (default: this UTC month)")
    parser.add_argument("--tenant", metavar="ID", help="only this tenant")
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    parser.add_argument(
        "--confirm-seconds",
        type=number_of_seconds,
        default=DEFAULT_CONFIRM_SECONDS,
        metavar="S",
        help="wait before reading lagging candidates again (default 5; 0: no second read)",
    )
    parser.add_argument("--no-topic", action="store_true", help="do not read the alerts topic")
    parser.set_defaults(run=run_reconcile_command)


async def run_reconcile_command(args: argparse.Namespace, settings: Settings) -> None:
    import asyncpg  # noqa: PLC0415 - the database stack, when the command runs

    from llm_usage.rollup.reconcile import (  # noqa: PLC0415 - the rollup's stack
        COMMAND_READERS,
        reconcile,
    )
    from llm_usage.storage.pool import create_pool  # noqa: PLC0415

    now = worker_clock()()
    period = checked_period(args.period) if args.period else current_period(now)
    tenant = checked_tenant(args.tenant) if args.tenant else None
    pool = await create_pool(settings.database_url, size=COMMAND_READERS)
    try:
        report = await reconcile(
            pool,
            settings,
            periods=[period],
            tenant_id=tenant,
            confirm_seconds=max(args.confirm_seconds, 0.0),
            read_topic=not args.no_topic,
            now=now,
            readers=COMMAND_READERS,
        )
    except (TransientError, OSError) as error:
        raise ServiceUnreachableError(
            f"reconcile could not run: {type(error).__name__}: {error}"
        ) from None
    except asyncpg.PostgresError as error:  # e.g. a database not migrated, a missing grant
        raise ConfigurationError(
            f"reconcile could not run: {type(error).__name__}: {error} (is the database "
            "migrated, and may this role read it?)"
        ) from None
    finally:
        await pool.close()
    print_report(report, as_json=args.json)
    if report.drifts:
        raise DriftFoundError(f"{len(report.drifts)} drift(s) in {period}, listed above")


def print_report(report: ReconcileReport, *, as_json: bool, out: TextIO = sys.stdout) -> None:
    for drift in report.drifts:
        print(json.dumps(drift.as_json()) if as_json else drift.text(), file=out)
    summary = report.summary()
    if as_json:
        print(json.dumps({"summary": summary}), file=out)
        return
    kinds = ", ".join(f"{kind} {n}" for kind, n in summary["by_kind"].items() if n)
    print(
        f"reconcile {', '.join(report.periods)}: {summary['drifts']} drift(s)"
        f"{f' ({kinds})' if kinds else ''}; {summary['events']} events in "
        f"{summary['seconds']} s ({summary['events_per_second']} events/s)"
        + ("" if report.topic_read else "; alerts topic not read"),
        file=out,
    )
