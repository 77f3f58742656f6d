"""An archived month read back: every file against the manifest, and, when the table is given,
the manifest against the table's own exact aggregates, slice by slice.

Each difference is one line naming the file or slice, the figure, and both values.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm_usage.archive.corrections import correction_spec, live_differences
from llm_usage.archive.export import (
    ARCHIVE_SCHEMA,
    EARLIER_ARCHIVE_SCHEMA,
    TIME_TYPE,
    month_bounds,
    quoted_table,
    totals_of,
)
from llm_usage.archive.manifest import (
    MANIFEST_NAME,
    SLICE_SQL,
    SLICES,
    TOKEN_COLUMNS,
    ArchivedFile,
    CorrectionFile,
    Manifest,
    ManifestError,
    Totals,
    slice_file_name,
    tenant_slice,
)
from llm_usage.archive.targets import ArchiveError, ArchiveTarget
from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.domain.periods import next_month, period_of
from llm_usage.storage.pool import Connection

_READ_CHUNK = 8 << 20


@dataclass
class VerifyReport:
    """What was checked and every difference found (none: the archive is whole)."""

    month: date
    files: int = 0
    rows: int = 0
    compared_with_table: str | None = None
    differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences


def read_manifest(target: ArchiveTarget, month: date) -> Manifest:
    """The month's manifest; a month missing or without one is an ArchiveError."""
    period = period_of(month)
    path = f"{target.month_dir(period)}/{MANIFEST_NAME}"
    try:
        text = target.read_bytes(path)
    except FileNotFoundError:
        if target.files_in(target.month_dir(period)):
            raise ArchiveError(
                f"the archive of {period} at {target.url} has no manifest: its export did not "
                "finish; archive the month again"
            ) from None
        raise ArchiveError(f"{period} is not archived at {target.url}") from None
    try:
        manifest = Manifest.from_json(text)
    except ManifestError as error:
        raise ArchiveError(
            f"the manifest of {period} at {target.url} is damaged: {error}"
        ) from None
    if manifest.month != month:
        raise ArchiveError(f"the manifest under {period} is of {manifest.period}")
    return manifest


def check_file(target: ArchiveTarget, month: date, entry: ArchivedFile) -> list[str]:
    """One file against its manifest entry: bytes, checksum, rows and sums, slice and month of
    every row. Reads the file twice: once as bytes (checksum), once as Parquet."""
    path = f"{target.month_dir(period_of(month))}/{entry.path}"
    name = entry.path
    found = _bytes_differences(target, path, entry)
    if found is None:
        return [f"{name}: missing"]
    try:
        totals, stray = _read_totals(target, path, month, entry.slice)
    except (pa.ArrowException, OSError) as error:
        return [*found, f"{name}: not readable as the archive's Parquet ({error})"]
    found += [
        f"{name}: {d}"
        for d in entry.totals.differences(totals, mine="the manifest", theirs="the file")
    ]
    found += [f"{name}: {s}" for s in stray]
    return found


def check_correction_file(target: ArchiveTarget, month: date, entry: CorrectionFile) -> list[str]:
    """One corrections file against its manifest entry: bytes, checksum, columns, rows, and the
    month of every row."""
    name = entry.path
    spec = correction_spec(entry)
    if spec is None:
        return [f"{name}: {entry.table} is not a corrections table archived as {name}"]
    path = f"{target.month_dir(period_of(month))}/{name}"
    found = _bytes_differences(target, path, entry)
    if found is None:
        return [f"{name}: missing"]
    start, end = (pa.scalar(bound, TIME_TYPE) for bound in month_bounds(month))
    rows = outside = 0
    try:
        with target.open_input(path) as stream:
            parquet = pq.ParquetFile(stream)
            if not parquet.schema_arrow.equals(spec.schema):
                return [*found, f"{name}: its columns are not {spec.table}'s"]
            for batch in parquet.iter_batches(batch_size=64 * 1024):
                rows += batch.num_rows
                when = batch.column(spec.month_column)
                stray = pc.or_(pc.less(when, start), pc.greater_equal(when, end))
                outside += pc.sum(pc.fill_null(stray, True)).as_py() or 0
    except (pa.ArrowException, OSError) as error:
        return [*found, f"{name}: not readable as Parquet ({error})"]
    if rows != entry.rows:
        found.append(f"{name}: rows: {entry.rows} in the manifest, {rows} in the file")
    if outside:
        found.append(f"{name}: {outside} rows outside {period_of(month)}")
    return found


def _bytes_differences(
    target: ArchiveTarget, path: str, entry: ArchivedFile | CorrectionFile
) -> list[str] | None:
    """The file's size and sha256 against its manifest entry (None: the file is missing)."""
    try:
        digest, size = _checksum(target, path)
    except FileNotFoundError:
        return None
    found = []
    if size != entry.bytes:
        found.append(f"{entry.path}: {size} bytes, the manifest says {entry.bytes}")
    if digest != entry.sha256:
        found.append(f"{entry.path}: sha256 {digest}, the manifest says {entry.sha256}")
    return found


def _checksum(target: ArchiveTarget, path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with target.open_input(path) as stream:
        while chunk := stream.read(_READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _read_totals(
    target: ArchiveTarget, path: str, month: date, slice_number: int
) -> tuple[Totals, list[str]]:
    stray: list[str] = []
    totals = Totals()
    start = pa.scalar(_midnight(month), pa.timestamp("us", tz="UTC"))
    end = pa.scalar(_midnight(next_month(month)), pa.timestamp("us", tz="UTC"))
    with target.open_input(path) as stream:
        parquet = pq.ParquetFile(stream)
        schema = parquet.schema_arrow
        if not (schema.equals(ARCHIVE_SCHEMA) or schema.equals(EARLIER_ARCHIVE_SCHEMA)):
            return totals, [f"its columns are not the archive's: {parquet.schema_arrow}"]
        for batch in parquet.iter_batches(batch_size=64 * 1024):
            totals = totals + totals_of(batch)
            tenants = pc.unique(batch.column("tenant_id")).to_pylist()
            wrong = sorted(str(t) for t in tenants if t is None or tenant_slice(t) != slice_number)
            if wrong:
                stray.append(f"tenants {wrong[:3]} do not belong in slice {slice_number}")
            occurred = batch.column("occurred_at")
            outside = pc.sum(pc.or_(pc.less(occurred, start), pc.greater_equal(occurred, end)))
            if outside.as_py():
                stray.append(f"{outside.as_py()} rows outside {period_of(month)}")
    return totals, stray


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def table_totals(connection: Connection, table: str) -> dict[int, Totals]:
    """The table's exact count, charge sum and token sums per slice, computed by PostgreSQL."""
    sums = ", ".join(f"coalesce(sum({name}), 0) AS {name}" for name in TOKEN_COLUMNS)
    rows = await connection.fetch(
        f"""
        SELECT {SLICE_SQL} AS slice, count(*) AS rows,
               coalesce(sum(customer_charge_usd), 0) AS charge, {sums}
        FROM {quoted_table(table)}
        GROUP BY 1
        """
    )
    return {
        row["slice"]: Totals(
            rows=row["rows"],
            charge_usd=EXACT_CONTEXT.plus(row["charge"]),
            tokens={name: int(row[name]) for name in TOKEN_COLUMNS},
        )
        for row in rows
    }


async def verify_archive(
    target: ArchiveTarget,
    month: date,
    *,
    connection: Connection | None = None,
    table: str | None = None,
) -> VerifyReport:
    """Read every file of `month` back and compare it with the manifest; with `connection` and
    `table`, compare the manifest with the table too. Differences are in the report, never
    raised; an archive that is missing or has no readable manifest is an ArchiveError."""
    manifest = await asyncio.to_thread(read_manifest, target, month)
    report = VerifyReport(month=month, files=len(manifest.files), rows=manifest.totals.rows)
    slices = sorted(entry.slice for entry in manifest.files)
    if slices != list(range(SLICES)):
        report.differences.append(f"the manifest lists slices {slices}, not 0..{SLICES - 1}")
    listed = {entry.path for entry in manifest.files} | {c.path for c in manifest.corrections}
    for entry in manifest.files:
        if entry.path != slice_file_name(entry.slice):
            report.differences.append(f"{entry.path}: is not the name of slice {entry.slice}")
        report.differences += await asyncio.to_thread(check_file, target, month, entry)
    for correction in manifest.corrections:
        report.differences += await asyncio.to_thread(
            check_correction_file, target, month, correction
        )
    present = await asyncio.to_thread(target.files_in, target.month_dir(manifest.period))
    report.differences += [
        f"{name}: in the archive but not in the manifest"
        for name in present
        if name not in listed and name != MANIFEST_NAME
    ]
    if connection is not None and table is not None:
        report.compared_with_table = table
        in_table = await table_totals(connection, table)
        for number in range(SLICES):
            archived = next((f.totals for f in manifest.files if f.slice == number), Totals())
            report.differences += [
                f"slice {number:02d}: {d}"
                for d in archived.differences(
                    in_table.get(number, Totals()), mine="the archive", theirs=table
                )
            ]
        # The month's corrections are still live until the month is dropped.
        report.differences += await live_differences(connection, month, manifest.corrections)
    return report
