"""The archive step of retention, for `llm-usage maintain`: archive a detached month (once) and
verify it against the table; the caller drops the table only when the report is OK.

Safe to run again after a crash at any point: a month whose manifest is already there is not
written again but verified against the table as it stands, so a run that died between the
archive and the DROP finishes the job; an export that died before its manifest is rewritten.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import date

from llm_usage.archive.corrections import delete_corrections
from llm_usage.archive.export import archive_table
from llm_usage.archive.manifest import MANIFEST_NAME
from llm_usage.archive.targets import ArchiveTarget
from llm_usage.archive.verify import VerifyReport, read_manifest, verify_archive
from llm_usage.domain.periods import period_of
from llm_usage.domain.retention import oldest_kept_month, partition_name
from llm_usage.storage.partitions import (
    detach_partition,
    drop_detached,
    month_states,
    set_month_state,
)
from llm_usage.storage.pool import Connection


async def archive_and_verify(
    connection: Connection, *, table: str, month: date, target: ArchiveTarget
) -> VerifyReport:
    """Archive `table` as `month` unless a complete archive of it is there, then verify the
    archive's files and compare them with `table`. Drop `table` only if the report is `ok`;
    otherwise keep it and tell a person (`report.differences` says what differs)."""
    manifest = f"{target.month_dir(period_of(month))}/{MANIFEST_NAME}"
    if not await asyncio.to_thread(target.exists, manifest):
        await archive_table(connection, table=table, month=month, target=target)
    return await verify_archive(target, month, connection=connection, table=table)


@dataclass(frozen=True)
class RetiredMonth:
    """A month past retention, after this run: dropped (its archive verified), or kept with the
    differences that stopped it."""

    month: date
    report: VerifyReport

    @property
    def dropped(self) -> bool:
        return self.report.ok


async def retire_months(
    connection: Connection, *, today: date, retention_months: int, target: ArchiveTarget
) -> list[RetiredMonth]:
    """Every month older than the oldest kept: detached, archived (with its corrections),
    verified, dropped with its corrections — or, when the archive does not match the table,
    detached and kept, with the differences. Each step is recorded (`usage_event_months.state`),
    so a run stopped anywhere resumes where it was. The legacy partition (everything before the
    partitioned table existed) is left alone."""
    states = await month_states(connection)
    oldest = oldest_kept_month(today, retention_months)
    retired = []
    for month in sorted(m for m, state in states.items() if m != date.min and m < oldest):
        if states[month] == "dropped":
            continue
        if states[month] in ("attached", "detaching"):
            await detach_partition(connection, month)
        report = await archive_and_verify(
            connection, table=partition_name(month), month=month, target=target
        )
        if report.ok:
            await set_month_state(connection, month, "archived")
            manifest = await asyncio.to_thread(read_manifest, target, month)
            # The month's corrections leave with its events, in one transaction: both or none.
            async with connection.transaction():
                await delete_corrections(connection, month, manifest.corrections)
                await drop_detached(connection, month)
        retired.append(RetiredMonth(month, report))
    return retired
