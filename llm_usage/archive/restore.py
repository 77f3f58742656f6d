"""An archived month back in PostgreSQL for an audit: `restored_usage_events_YYYY_MM`, a plain
table with the archive's columns, never the live `llm_usage_events`.

The files are verified against the manifest first; a damaged archive is refused, not loaded.
The table is created and filled in one transaction: it is there whole, or not at all.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from datetime import date

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from llm_usage.archive.export import ARCHIVE_COLUMNS
from llm_usage.archive.targets import ArchiveError, ArchiveTarget
from llm_usage.archive.verify import read_manifest, verify_archive
from llm_usage.domain.periods import period_of
from llm_usage.storage.pool import Connection

_BATCH_ROWS = 32 * 1024


def restored_table_name(month: date) -> str:
    return f"restored_usage_events_{month.year:04d}_{month.month:02d}"


def _columns_of(target: ArchiveTarget, path: str) -> list[str]:
    """The archive columns a file holds: all of them, or an earlier release's."""
    with target.open_input(path) as stream:
        names = set(pq.ParquetFile(stream).schema_arrow.names)
    return [column for column in ARCHIVE_COLUMNS if column in names]


def _csv_blocks(target: ArchiveTarget, path: str, columns: list[str]) -> Iterator[bytes]:
    """A file's rows as CSV that COPY reads back exactly: strings quoted (so '' stays empty and
    NULL stays NULL), decimals in full, times as UTC with `Z`."""
    with target.open_input(path) as stream:
        for batch in pq.ParquetFile(stream).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            buffer = io.BytesIO()
            pacsv.write_csv(batch, buffer, pacsv.WriteOptions(include_header=False))
            yield buffer.getvalue()


async def restore_month(connection: Connection, target: ArchiveTarget, month: date) -> int:
    """Load the archived `month` into `restored_usage_events_YYYY_MM`; return the rows loaded.

    Raises ArchiveError when the archive differs from its manifest or the table already exists.
    """
    period = period_of(month)
    report = await verify_archive(target, month)
    if not report.ok:
        raise ArchiveError(
            f"the archive of {period} differs from its manifest ({report.differences[0]}); "
            f"see `llm-usage archive verify --period {period}`; nothing was restored"
        )
    manifest = await asyncio.to_thread(read_manifest, target, month)
    manifest_rows = manifest.totals.rows
    name = restored_table_name(month)
    if await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
        raise ArchiveError(f"{name} already exists; drop it to restore {period} again")
    # An earlier release's archive has no pricing columns: its events were charged by the
    # gateway, which the defaults say.
    columns = ", ".join(
        f"{column} {pg_type}" + (" NOT NULL DEFAULT false" if column == "charge_estimated" else "")
        for column, pg_type in ARCHIVE_COLUMNS.items()
    )
    directory = target.month_dir(period)
    paths = [f"{directory}/{entry.path}" for entry in manifest.files]
    held = await asyncio.to_thread(_columns_of, target, paths[0]) if paths else []

    async def csv_source() -> AsyncIterator[bytes]:
        for path in paths:
            blocks = _csv_blocks(target, path, held)
            while (block := await asyncio.to_thread(next, blocks, None)) is not None:
                yield block

    async with connection.transaction():
        await connection.execute(f"CREATE TABLE {name} ({columns})")
        await connection.copy_to_table(name, source=csv_source(), columns=held, format="csv")
        loaded = await connection.fetchval(f"SELECT count(*) FROM {name}")
        if loaded != manifest_rows:
            raise ArchiveError(
                f"loaded {loaded} rows of {period}, the manifest says {manifest_rows}; "
                "nothing was restored"
            )
    return int(loaded)
