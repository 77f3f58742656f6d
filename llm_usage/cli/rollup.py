"""`llm-usage rollup run | close | schedule`: invoice lines for people and for finance's tools."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from llm_usage.cli.args import Commands, checked_period
from llm_usage.core.clock import worker_clock
from llm_usage.domain.invoices import InvoiceLine

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings
    from llm_usage.rollup.run import RollupResult


def add_parser(commands: Commands) -> None:
    rollup = commands.add_parser("rollup", help="monthly invoice lines: run, close, schedule")
    rollup.set_defaults(run=run_rollup_command)
    actions = rollup.add_subparsers(dest="rollup_command", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="compute and store a month's lines (idempotent)")
    run.add_argument("--period", required=True, metavar="YYYY-MM")
    run.add_argument("--tenant", metavar="ID", help="only this tenant's lines")
    run.add_argument("--json", action="store_true", help="one JSON object a line")
    close = actions.add_parser("close", help="run a past month one last time and close it")
    close.add_argument("--period", required=True, metavar="YYYY-MM")
    close.add_argument("--json", action="store_true", help="one JSON object a line")
    actions.add_parser("schedule", help="refresh previews and close months, until SIGTERM")


async def run_rollup_command(args: argparse.Namespace, settings: Settings) -> None:
    if args.rollup_command == "schedule":
        from llm_usage.rollup.schedule import run_schedule  # noqa: PLC0415

        await run_schedule(settings)
        return
    from llm_usage.rollup.run import close_month, run_rollup  # noqa: PLC0415
    from llm_usage.storage.pool import create_pool  # noqa: PLC0415

    period = checked_period(args.period)
    progress = ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    pool = await create_pool(settings.database_url, size=1)
    try:
        if args.rollup_command == "close":
            result = await close_month(pool, period=period, now=worker_clock()(), progress=progress)
        else:
            result = await run_rollup(pool, period=period, tenant_id=args.tenant, progress=progress)
    finally:
        await pool.close()
        if progress is not None:
            progress.finish()
    print_result(result, as_json=args.json)


class ProgressBar:
    """Tenants done so far, redrawn in place on a terminal (long runs only: from 2 steps)."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        from llm_usage.rollup.run import TENANTS_PER_STEP  # noqa: PLC0415 - the rollup's stack

        self._stream = stream
        self._width = width
        self._one_step = TENANTS_PER_STEP
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if total <= self._one_step:
            return
        filled = self._width * done // total
        bar = "#" * filled + "." * (self._width - filled)
        self._stream.write(f"\rtenants [{bar}] {done}/{total}")
        self._stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()


def print_result(result: RollupResult, *, as_json: bool) -> None:
    if as_json:
        for line in result.lines:
            print(json.dumps(line.as_json(), ensure_ascii=False, sort_keys=False))
        return
    state = "closed" if result.closed else "open (preview; lines change until it is closed)"
    print(f"{result.period}: {len(result.lines)} lines, {state}")
    if result.lines:
        print(_table(result.lines))


def _table(lines: Sequence[InvoiceLine]) -> str:
    rows = [("tenant", "deployment", "kind", "qty", "amount", "description")]
    rows += [
        (
            line.tenant_id,
            line.deployment_id if line.deployment_id is not None else "(none)",
            line.kind,
            str(line.qty),
            f"{line.amount_cents // 100}.{line.amount_cents % 100:02d} USD",
            line.description,
        )
        for line in lines
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    )
