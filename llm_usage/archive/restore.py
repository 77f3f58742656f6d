"""An archived month back in PostgreSQL for an audit: `restored_usage_events_YYYY_MM`, a plain
table with the archive's columns, never the live `llm_usage_events`; its corrections beside it
in `restored_usage_corrections_YYYY_MM` and `restored_usage_event_effective_YYYY_MM`.

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

from llm_usage.archive.corrections import CORRECTION_TABLES, correction_spec
from llm_usage.archive.export import ARCHIVE_COLUMNS
from llm_usage.archive.manifest import CorrectionFile
from llm_usage.archive.targets import ArchiveError, ArchiveTarget
from llm_usage.archive.verify import read_manifest, verify_archive
from llm_usage.domain.periods import period_of
from llm_usage.storage.pool import Connection

_BATCH_ROWS = 32 * 1024


def restored_table_name(month: date) -> str:
    return f"restored_usage_events_{month.year:04d}_{month.month:02d}"


def restored_table_names(month: date) -> list[str]:
    """Every table a restore of `month` creates: its events', then its corrections'."""
    return [restored_table_name(month), *(spec.restored_name(month) for spec in CORRECTION_TABLES)]


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
        for entry in manifest.corrections:
            await _restore_corrections(connection, target, month, entry)
    return int(loaded)


async def _restore_corrections(
    connection: Connection, target: ArchiveTarget, month: date, entry: CorrectionFile
) -> None:
    """The month's rows of a corrections table into `restored_<table>_YYYY_MM`."""
    spec = correction_spec(entry)
    if spec is None:  # verified already: cannot happen
        raise ArchiveError(f"{entry.path}: {entry.table} is not a corrections table")
    name = spec.restored_name(month)
    if await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
        raise ArchiveError(f"{name} already exists; drop it to restore {period_of(month)} again")
    columns = ", ".join(f"{column} {pg_type}" for column, pg_type in spec.columns.items())
    await connection.execute(f"CREATE TABLE {name} ({columns})")
    path = f"{target.month_dir(period_of(month))}/{entry.path}"
    blocks = _csv_blocks(target, path, list(spec.columns))

    async def csv_source() -> AsyncIterator[bytes]:
        while (block := await asyncio.to_thread(next, blocks, None)) is not None:
            yield block

    await connection.copy_to_table(
        name, source=csv_source(), columns=list(spec.columns), format="csv"
    )
    loaded = await connection.fetchval(f"SELECT count(*) FROM {name}")
    if loaded != entry.rows:
        raise ArchiveError(
            f"loaded {loaded} rows of {entry.path}, the manifest says {entry.rows}; "
            "nothing was restored"
        )
