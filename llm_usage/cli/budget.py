"""`llm-usage budget status`: where each of a tenant's policies stands this UTC day and month.

A bad argument, a database that cannot be reached or is not migrated each end in one line and
exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import TYPE_CHECKING, TextIO

from llm_usage.cli.args import Commands, OneLineArgumentParser, checked_tenant
from llm_usage.cli.budget_tables import aligned_table, budget_tables
from llm_usage.core.clock import worker_clock
from llm_usage.domain.money import canonical_decimal

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings


def add_parser(commands: Commands) -> None:
    """`budget status`: every mistake in its arguments is one line and exit 2."""
    budget = commands.add_parser("budget", help="spend against the budget policies")
    budget.set_defaults(run=run_budget_command)
    budget_commands = budget.add_subparsers(
        dest="budget_command",
        required=True,
        metavar="ACTION",
        parser_class=OneLineArgumentParser,
    )
    status = budget_commands.add_parser(
        "status",
        help="this UTC day's and month's spend, held, limit, percent and level per policy",
    )
    status.add_argument("--tenant", required=True, metavar="ID")
    status.add_argument("--json", action="store_true", help="one JSON object a line")


async def run_budget_command(args: argparse.Namespace, settings: Settings) -> None:
    """`llm-usage budget status`, for the UTC day and month of the workers' now."""
    await budget_status(settings, args, sys.stdout, now=worker_clock()())


async def budget_status(
    settings: Settings, args: argparse.Namespace, out: TextIO, *, now: datetime
) -> None:
    from llm_usage.storage.budget_status import tenant_budget_status  # noqa: PLC0415

    tenant_id = checked_tenant(args.tenant)
    async with budget_tables(settings) as connection:
        statuses = await tenant_budget_status(connection, tenant_id, now=now)
    if args.json:
        for status in statuses:
            print(json.dumps(status.to_json()), file=out)
        return
    if not statuses:
        print(
            f"tenant {tenant_id!r} has no budget policies; set one with `llm-usage policy set`",
            file=out,
        )
        return
    headers = [
        "SCOPE_TYPE",
        "SCOPE_ID",
        "WINDOW",
        "PERIOD_START",
        "SPEND_USD",
        "HELD_USD",
        "LIMIT_USD",
        "PERCENT",
        "LEVEL",
        "ENFORCEMENT",
    ]
    rows = [
        [
            status.scope_type.value,
            status.scope_id,
            status.window.value,
            status.period_start.isoformat(),
            canonical_decimal(status.spend_usd),
            canonical_decimal(status.held_usd),
            canonical_decimal(status.limit_usd),
            format(status.percent, "f"),
            status.level.value,
            status.enforcement.value,
        ]
        for status in statuses
    ]
    print(aligned_table(headers, rows, right={4, 5, 6, 7}), file=out)
