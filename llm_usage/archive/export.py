"""A (detached) partition table to Parquet: one file per tenant slice, then the manifest.

One `COPY (SELECT …) TO STDOUT (FORMAT csv)` streams the table once; a thread parses the CSV with
pyarrow into typed columns (money as decimal128(38,18), times as UTC microseconds), routes each
block's rows to their slice's writer and writes a row group whenever a slice has gathered
`ROW_GROUP_ROWS` rows. Memory stays bounded: a few queued chunks of CSV, and at most a row group
per slice. The manifest's figures are summed from exactly the rows written, and the manifest is
written last: a month without one is an interrupted export, never a complete archive.

Money: every amount the contract admits has at most 12 digits before the point and 18 after, so
decimal128(38, 18) holds each one exactly and any Parquet reader sums them as decimals; a value
beyond that (a row no release could store) stops the export rather than being rounded. Equal in
value, not in spelling: `0.0054` comes back as `0.005400000000000000`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import queue
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import IO, Any, Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from llm_usage.archive.manifest import (
    MANIFEST_NAME,
    SLICES,
    TOKEN_COLUMNS,
    ArchivedFile,
    Manifest,
    Totals,
    slice_file_name,
    tenant_slice,
)
from llm_usage.archive.targets import ArchiveError, ArchiveTarget
from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.domain.periods import period_of
from llm_usage.storage.pool import Connection
from llm_usage.storage.usage_events import USAGE_EVENT_COLUMNS

# The archived columns: the events' own, then when the database received each one.
ARCHIVE_COLUMNS: Final[Mapping[str, str]] = {**USAGE_EVENT_COLUMNS, "received_at": "timestamptz"}
MONEY_TYPE: Final = pa.decimal128(38, 18)
TIME_TYPE: Final = pa.timestamp("us", tz="UTC")
_ARROW_TYPES: Final = {
    "text": pa.string(),
    "bigint": pa.int64(),
    "numeric": MONEY_TYPE,
    "timestamptz": TIME_TYPE,
    "boolean": pa.bool_(),
}
ARCHIVE_SCHEMA: Final = pa.schema(
    [pa.field(name, _ARROW_TYPES[pg_type]) for name, pg_type in ARCHIVE_COLUMNS.items()]
)
# Columns added after archives were first written: an archive without them is one of an earlier
# release, still verified and restored (every event then was charged by the gateway).
LATER_COLUMNS: Final = ("charge_estimated", "price_effective_from")
EARLIER_ARCHIVE_SCHEMA: Final = pa.schema(
    [field for field in ARCHIVE_SCHEMA if field.name not in LATER_COLUMNS]
)
ROW_GROUP_ROWS: Final = 32 * 1024
_CSV_BLOCK_BYTES: Final = 4 << 20
_QUEUED_CHUNKS: Final = 64
_TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}(\.[a-z_][a-z0-9_]{0,62})?$")


def quoted_table(table: str) -> str:
    """`table` (optionally `schema.table`, lower-case) quoted for SQL; anything else refused."""
    if not _TABLE_NAME.match(table):
        raise ArchiveError(f"{table!r} is not a table name (lower-case letters, digits and _)")
    return ".".join(f'"{part}"' for part in table.split("."))


def _select_list() -> str:
    """The COPY's columns: times as whole UTC microseconds since the epoch (exact, no time zone
    or date style to parse). The slice is computed here, per distinct tenant, not by the
    database: sha256 per row in SQL costs PostgreSQL more than the whole rest of the COPY."""
    columns = []
    for name, pg_type in ARCHIVE_COLUMNS.items():
        if pg_type == "timestamptz":
            columns.append(f"(extract(epoch FROM {name}) * 1000000)::bigint")
        else:
            columns.append(name)
    return ", ".join(columns)


_CSV_NAMES: Final = list(ARCHIVE_COLUMNS)
_CSV_TYPES: Final = {
    name: (pa.int64() if pg_type == "timestamptz" else _ARROW_TYPES[pg_type])
    for name, pg_type in ARCHIVE_COLUMNS.items()
}


def totals_of(table: pa.Table | pa.RecordBatch) -> Totals:
    """Exact totals of some archived rows. Sums are taken per call over at most a row group, in
    decimal128 (38 digits: room for 10¹⁹ dollars of charge or tokens), then added up exactly."""
    charge = pc.sum(table.column("customer_charge_usd")).as_py()
    tokens = {}
    for name in TOKEN_COLUMNS:
        total = pc.sum(table.column(name).cast(pa.decimal128(38, 0))).as_py()
        tokens[name] = int(total) if total is not None else 0
    return Totals(
        rows=table.num_rows,
        charge_usd=EXACT_CONTEXT.plus(charge) if charge is not None else Decimal(0),
        tokens=tokens,
    )


class HashingSink(io.RawIOBase):
    """Forwards writes to `stream`, counting bytes and hashing them (one pass, no read-back)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.digest = hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.bytes += view.nbytes
        self._stream.write(view)
        return view.nbytes

    def close(self) -> None:  # the target closes the stream: that completes it
        super().close()


@dataclass
class _SliceWriter:
    number: int
    sink: HashingSink
    writer: pq.ParquetWriter
    pending: list[pa.RecordBatch] = field(default_factory=list)
    pending_rows: int = 0
    totals: Totals = field(default_factory=Totals)

    def add(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        if self.pending_rows >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.pending_rows:
            return
        table = pa.Table.from_batches(self.pending, schema=ARCHIVE_SCHEMA).combine_chunks()
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.totals = self.totals + totals_of(table)
        self.pending = []
        self.pending_rows = 0


class _ChunkQueue(io.RawIOBase):
    """The CSV bytes COPY sends, read by the parsing thread; a `None` chunk ends them."""

    def __init__(self) -> None:
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._current = memoryview(b"")
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._current and not self._ended:
            chunk = self.chunks.get()
            if chunk is None:
                self._ended = True
            else:
                self._current = memoryview(chunk)
        size = min(len(buffer), len(self._current))
        buffer[:size] = self._current[:size]
        self._current = self._current[size:]
        return size

    def drain(self) -> None:
        """Take chunks until the end, so that a producer never blocks on a dead reader."""
        while not self._ended:
            if self.chunks.get() is None:
                self._ended = True


def _time_columns(batch: pa.RecordBatch) -> pa.RecordBatch:
    arrays = []
    for name, pg_type in ARCHIVE_COLUMNS.items():
        column = batch.column(name)
        if pg_type == "timestamptz":
            column = column.cast(pa.timestamp("us")).cast(TIME_TYPE)
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, schema=ARCHIVE_SCHEMA)


def _parse_and_route(source: _ChunkQueue, writers: list[_SliceWriter]) -> None:
    try:
        reader = _csv_reader(source)
    except pa.ArrowInvalid as error:
        if str(error).startswith("Empty CSV file"):  # a month without events: empty files
            return
        raise
    known: dict[str, int] = {}
    for raw in reader:
        batch = _time_columns(raw)
        tenants = batch.column("tenant_id")
        distinct = pc.unique(tenants)
        slice_of_distinct = pa.array(
            [_cached_slice(known, tenant) for tenant in distinct.to_pylist()], pa.int8()
        )
        slices = pc.take(slice_of_distinct, pc.index_in(tenants, distinct))
        for number in pc.unique(slices).to_pylist():
            writers[number].add(batch.filter(pc.equal(slices, number)))


def _csv_reader(source: _ChunkQueue) -> pacsv.CSVStreamingReader:
    return pacsv.open_csv(
        io.BufferedReader(source, buffer_size=1 << 20),
        read_options=pacsv.ReadOptions(column_names=_CSV_NAMES, block_size=_CSV_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types=_CSV_TYPES,
            # COPY writes NULL as an empty field and '' as "": only the first is null.
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            true_values=["t"],  # how COPY writes a boolean
            false_values=["f"],
        ),
    )


def _cached_slice(known: dict[str, int], tenant: str) -> int:
    number = known.get(tenant)
    if number is None:
        number = known[tenant] = tenant_slice(tenant)
    return number


async def archive_table(
    connection: Connection,
    *,
    table: str,
    month: date,
    target: ArchiveTarget,
    overwrite: bool = False,
    now: datetime | None = None,
) -> Manifest:
    """Write every row of `table` (a detached monthly partition) to `target` as the archive of
    `month`, and return its manifest (written last).

    Refuses a month whose manifest is already there unless `overwrite`. Reads the table in one
    COPY inside a REPEATABLE READ transaction (or the caller's, if one is open), so the files and
    the manifest describe one snapshot. Raises ArchiveError for a table that is missing or holds
    rows of another month.
    """
    period = period_of(month)
    directory = target.month_dir(period)
    manifest_path = f"{directory}/{MANIFEST_NAME}"
    if await asyncio.to_thread(target.exists, manifest_path):
        if not overwrite:
            raise ArchiveError(
                f"{period} is already archived at {target.url}; verify it with "
                f"`llm-usage archive verify --period {period}`"
            )
        # From here on the month is incomplete until its manifest is written again.
        await asyncio.to_thread(target.delete, manifest_path)
    name = quoted_table(table)
    exists = await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
    if not exists:
        raise ArchiveError(f"there is no table {table} to archive")
    query = f"SELECT {_select_list()} FROM {name}"
    # One snapshot for the check and the COPY; inside a caller's transaction, that one's.
    snapshot = (
        contextlib.nullcontext()
        if connection.is_in_transaction()
        else connection.transaction(isolation="repeatable_read", readonly=True)
    )
    async with snapshot:
        outside = await connection.fetchval(
            f"SELECT count(*) FROM {name} WHERE occurred_at < $1 OR occurred_at >= $2",
            *month_bounds(month),
        )
        if outside:
            raise ArchiveError(
                f"{table} holds {outside} rows outside {period}; it is not that month's partition"
            )
        files = await _export(connection, query, target, directory)
        # The month's corrections, from the same snapshot (they leave with the month).
        from llm_usage.archive.corrections import export_corrections  # noqa: PLC0415 - a cycle

        corrections = await export_corrections(
            connection, month=month, target=target, directory=directory
        )
    manifest = Manifest(
        month=month,
        source_table=table,
        files=files,
        columns=list(ARCHIVE_COLUMNS),
        created_at=(now or datetime.now(UTC)).astimezone(UTC).isoformat(),
        corrections=corrections,
    )
    await asyncio.to_thread(_write_manifest, target, manifest_path, manifest)
    return manifest


def _write_manifest(target: ArchiveTarget, path: str, manifest: Manifest) -> None:
    with target.writing(path) as stream:
        stream.write(manifest.to_json().encode("utf-8"))


def month_bounds(month: date) -> tuple[datetime, datetime]:
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    end = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


async def _export(
    connection: Connection, query: str, target: ArchiveTarget, directory: str
) -> list[ArchivedFile]:
    source = _ChunkQueue()
    loop = asyncio.get_running_loop()
    failure: list[BaseException] = []
    files: list[ArchivedFile] = []

    def write_files() -> None:
        try:
            with _slice_writers(target, directory) as writers:
                _parse_and_route(source, writers)
                for writer in writers:
                    writer.flush()
                    writer.writer.close()
                    files.append(
                        ArchivedFile(
                            slice=writer.number,
                            path=slice_file_name(writer.number),
                            totals=writer.totals,
                            bytes=writer.sink.bytes,
                            sha256=writer.sink.digest.hexdigest(),
                        )
                    )
        except BaseException as error:  # noqa: BLE001 - handed to the event loop's side
            failure.append(error)
            source.drain()

    async def sink(chunk: bytes) -> None:
        if failure:
            raise ArchiveError("the Parquet writer stopped")  # ends the COPY; the cause follows
        try:
            source.chunks.put_nowait(chunk)
        except queue.Full:
            await loop.run_in_executor(None, source.chunks.put, chunk)

    thread = threading.Thread(target=write_files, name="archive-writer", daemon=True)
    thread.start()
    try:
        await connection.copy_from_query(query, output=sink, format="csv")
    finally:
        await loop.run_in_executor(None, source.chunks.put, None)
        await loop.run_in_executor(None, thread.join)
    if failure:
        error = failure[0]
        if isinstance(error, pa.ArrowInvalid):
            raise ArchiveError(f"a row cannot be archived exactly: {error}") from error
        raise error
    return files


class _SliceWriters:
    """Opens the 16 slice files in order; any error closes (and so drops) every one."""

    def __init__(self, target: ArchiveTarget, directory: str) -> None:
        self._target = target
        self._directory = directory
        self._contexts: list[Any] = []
        self._writers: list[_SliceWriter] = []

    def __enter__(self) -> list[_SliceWriter]:
        writers = self._writers
        try:
            for number in range(SLICES):
                context = self._target.writing(f"{self._directory}/{slice_file_name(number)}")
                stream = context.__enter__()
                self._contexts.append(context)
                sink = HashingSink(stream)
                parquet = pq.ParquetWriter(
                    sink, ARCHIVE_SCHEMA, compression="zstd", write_statistics=True
                )
                writers.append(_SliceWriter(number=number, sink=sink, writer=parquet))
        except BaseException as error:
            self.__exit__(type(error), error, error.__traceback__)
            raise
        return writers

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        for writer in self._writers:  # before its stream closes (a no-op once closed)
            with contextlib.suppress(Exception):
                writer.writer.close()
        for context in reversed(self._contexts):
            context.__exit__(kind, error, traceback)
        self._contexts = []


def _slice_writers(target: ArchiveTarget, directory: str) -> _SliceWriters:
    return _SliceWriters(target, directory)
