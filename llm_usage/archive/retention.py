"""The archive step of retention, for `llm-usage maintain`: archive a detached month (once) and
verify it against the table; the caller drops the table only when the report is OK.

Safe to run again after a crash at any point: a month whose manifest is already there is not
written again but verified against the table as it stands, so a run that died between the
archive and the DROP finishes the job; an export that died before its manifest is rewritten.
"""

from __future__ import annotations

import asyncio
from datetime import date

from llm_usage.archive.export import archive_table
from llm_usage.archive.manifest import MANIFEST_NAME
from llm_usage.archive.targets import ArchiveTarget
from llm_usage.archive.verify import VerifyReport, verify_archive
from llm_usage.domain.periods import period_of
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
