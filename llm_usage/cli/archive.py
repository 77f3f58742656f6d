"""`llm-usage archive list|verify|restore`: the months archived at ARCHIVE_URL, read back and
checked, or brought back into a plain table for an audit.

`verify` prints one line per difference and exits 1 when there is any; a person's mistake (a
bad period, a target that cannot be reached, a month that is not archived) is one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TextIO

from llm_usage.cli.args import Commands, OneLineArgumentParser, checked_period
from llm_usage.core.errors import PipelineError

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings


class ArchiveDiffersError(PipelineError):
    """`archive verify` found differences (each already printed): exit 1."""


def add_parser(commands: Commands) -> None:
    archive = commands.add_parser(
        "archive", help="archived months of usage events: list, verify, restore for an audit"
    )
    archive.set_defaults(run=run_archive_command)
    actions = archive.add_subparsers(
        dest="archive_command",
        required=True,
        metavar="ACTION",
        parser_class=OneLineArgumentParser,
    )
    actions.add_parser("list", help="the months at ARCHIVE_URL, with their totals and state")
    verify = actions.add_parser(
        "verify",
        help="read a month's files back against its manifest (and a table); exit 1 on a difference",
    )
    verify.add_argument("--period", required=True, metavar="YYYY-MM")
    verify.add_argument(
        "--table",
        metavar="NAME",
        help="also compare with this table's own sums (e.g. the detached partition)",
    )
    restore = actions.add_parser(
        "restore", help="load a month into the plain table restored_usage_events_YYYY_MM"
    )
    restore.add_argument("--period", required=True, metavar="YYYY-MM")


async def run_archive_command(args: argparse.Namespace, settings: Settings) -> None:
    if args.archive_command == "list":
        await archive_list(settings, sys.stdout)
    elif args.archive_command == "verify":
        await archive_verify(settings, args.period, args.table, sys.stdout)
    else:
        await archive_restore(settings, args.period, sys.stdout)


async def archive_list(settings: Settings, out: TextIO) -> None:
    import asyncio  # noqa: PLC0415

    from llm_usage.archive.targets import ArchiveError, archive_target  # noqa: PLC0415
    from llm_usage.archive.verify import read_manifest  # noqa: PLC0415
    from llm_usage.cli.budget_tables import aligned_table  # noqa: PLC0415
    from llm_usage.domain.money import canonical_decimal  # noqa: PLC0415
    from llm_usage.domain.periods import parse_period  # noqa: PLC0415

    target = archive_target(settings)
    months = await asyncio.to_thread(target.months)
    if not months:
        print(f"no month is archived at {target.url}", file=out)
        return
    rows = []
    for period in months:
        try:
            manifest = await asyncio.to_thread(read_manifest, target, parse_period(period))
        except ArchiveError as error:
            state = "damaged" if "damaged" in str(error) else "incomplete"
            rows.append([period, state, "", "", "", ""])
            continue
        totals = manifest.totals
        size = sum(entry.bytes for entry in manifest.files)
        rows.append(
            [
                period,
                "archived",
                str(len(manifest.files)),
                str(totals.rows),
                canonical_decimal(totals.charge_usd),
                str(size),
            ]
        )
    headers = ["MONTH", "STATE", "FILES", "ROWS", "CHARGE_USD", "BYTES"]
    print(f"archive: {target.url}", file=out)
    print(aligned_table(headers, rows, right={2, 3, 4, 5}), file=out)


async def archive_verify(settings: Settings, period: str, table: str | None, out: TextIO) -> None:
    from llm_usage.archive.targets import archive_target  # noqa: PLC0415
    from llm_usage.archive.verify import verify_archive  # noqa: PLC0415
    from llm_usage.domain.periods import parse_period  # noqa: PLC0415

    month = parse_period(checked_period(period))
    target = archive_target(settings)
    if table is None:
        report = await verify_archive(target, month)
    else:
        from llm_usage.cli.budget_tables import budget_tables  # noqa: PLC0415

        async with budget_tables(settings) as connection:
            report = await verify_archive(target, month, connection=connection, table=table)
    for difference in report.differences:
        print(f"{period}: {difference}", file=out)
    if not report.ok:
        raise ArchiveDiffersError(
            f"the archive of {period} at {target.url} has {len(report.differences)} "
            "difference(s), listed above"
        )
    against = f" and with {report.compared_with_table}" if report.compared_with_table else ""
    print(
        f"{period}: OK: {report.files} files, {report.rows} rows agree with the manifest{against}",
        file=out,
    )


async def archive_restore(settings: Settings, period: str, out: TextIO) -> None:
    from llm_usage.archive.restore import restore_month, restored_table_name  # noqa: PLC0415
    from llm_usage.archive.targets import archive_target  # noqa: PLC0415
    from llm_usage.cli.budget_tables import budget_tables  # noqa: PLC0415
    from llm_usage.domain.periods import parse_period  # noqa: PLC0415

    month = parse_period(checked_period(period))
    target = archive_target(settings)
    async with budget_tables(settings) as connection:
        rows = await restore_month(connection, target, month)
    print(f"{period}: restored {rows} rows into {restored_table_name(month)}", file=out)
