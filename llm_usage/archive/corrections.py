"""A month's corrections leave with its events (design §4, A11): the month's `usage_corrections`
rows (`event_occurred_at` in the month) and `usage_event_effective` rows (`occurred_at` in the
month) are archived beside the events, one Parquet file per table, listed in the manifest with
their rows, bytes and sha256; verified like the events' files; deleted from the live tables only
in the transaction that drops the month's partition, after its archive was verified; and
restored beside the events into `restored_<table>_YYYY_MM`.

A correction still waiting for its event, or dead-lettered (`unknown`, no `event_occurred_at`),
belongs to no month and is never archived here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Final

import pyarrow as pa
import pyarrow.parquet as pq

from llm_usage.archive.export import (
    MONEY_TYPE,
    ROW_GROUP_ROWS,
    TIME_TYPE,
    HashingSink,
    month_bounds,
)
from llm_usage.archive.manifest import CorrectionFile
from llm_usage.archive.targets import ArchiveError, ArchiveTarget
from llm_usage.domain.periods import period_of
from llm_usage.storage.pool import Connection

_ARROW_TYPES: Final = {
    "text": pa.string(),
    "jsonb": pa.string(),  # as PostgreSQL prints it: money inside stays exact text
    "integer": pa.int32(),
    "bigint": pa.int64(),
    "numeric": MONEY_TYPE,
    "timestamptz": TIME_TYPE,
    "boolean": pa.bool_(),
}


@dataclass(frozen=True)
class CorrectionTable:
    """A live table whose rows of a month are archived with it: by `month_column`."""

    table: str
    path: str
    month_column: str
    columns: Mapping[str, str]  # name -> PostgreSQL type, as migration 0016 creates them

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(name, _ARROW_TYPES[pg_type]) for name, pg_type in self.columns.items()]
        )

    def restored_name(self, month: date) -> str:
        return f"restored_{self.table}_{month.year:04d}_{month.month:02d}"

    def of_month(self) -> str:
        """The condition on the month's rows ($1 its first instant, $2 the next month's)."""
        return f"{self.month_column} >= $1 AND {self.month_column} < $2"


CORRECTION_TABLES: Final = (
    CorrectionTable(
        table="usage_corrections",
        path="corrections.parquet",
        month_column="event_occurred_at",
        columns={
            "tenant_id": "text",
            "correction_id": "text",
            "gateway_request_id": "text",
            "action": "text",
            "fields": "jsonb",
            "reason": "text",
            "actor": "text",
            "occurred_at": "timestamptz",
            "event_occurred_at": "timestamptz",
            "received_at": "timestamptz",
            "verdict": "text",
            "won": "boolean",
            "late": "boolean",
            "from_deployment_id": "text",
            "to_deployment_id": "text",
            "charge_delta_usd": "numeric",
            "billed_in": "text",
        },
    ),
    CorrectionTable(
        table="usage_event_effective",
        path="effective.parquet",
        month_column="occurred_at",
        columns={
            "tenant_id": "text",
            "occurred_at": "timestamptz",
            "gateway_request_id": "text",
            "winner_occurred_at": "timestamptz",
            "winner_id": "text",
            "voided": "boolean",
            "deployment_id": "text",
            "user_id": "text",
            "agent_id": "text",
            "input_tokens": "bigint",
            "output_tokens": "bigint",
            "cached_input_tokens": "bigint",
            "reasoning_tokens": "bigint",
            "total_tokens": "bigint",
            "customer_charge_usd": "numeric",
            "customer_charge_cents": "bigint",
            "charge_estimated": "boolean",
            "corrections": "integer",
        },
    ),
)


def _select(spec: CorrectionTable) -> str:
    columns = ", ".join(
        f"{name}::text" if pg_type == "jsonb" else name for name, pg_type in spec.columns.items()
    )
    return f"SELECT {columns} FROM {spec.table} WHERE {spec.of_month()} ORDER BY tenant_id"


async def export_corrections(
    connection: Connection, *, month: date, target: ArchiveTarget, directory: str
) -> list[CorrectionFile]:
    """Write the month's rows of each corrections table to `directory`, in row groups of at
    most ROW_GROUP_ROWS rows. Runs inside the caller's transaction (the events' snapshot)."""
    if not connection.is_in_transaction():
        raise ArchiveError("the corrections are exported in the events' snapshot transaction")
    return [
        await _export_table(connection, spec, month=month, target=target, directory=directory)
        for spec in CORRECTION_TABLES
    ]


async def _export_table(
    connection: Connection,
    spec: CorrectionTable,
    *,
    month: date,
    target: ArchiveTarget,
    directory: str,
) -> CorrectionFile:
    schema = spec.schema
    rows = 0
    with target.writing(f"{directory}/{spec.path}") as stream:
        sink = HashingSink(stream)
        writer = pq.ParquetWriter(sink, schema, compression="zstd", write_statistics=True)
        try:
            pending: list[dict[str, object]] = []
            cursor = connection.cursor(_select(spec), *month_bounds(month), prefetch=1024)
            async for record in cursor:
                pending.append(dict(record))
                if len(pending) >= ROW_GROUP_ROWS:
                    rows += await asyncio.to_thread(_write_rows, writer, schema, pending)
                    pending = []
            rows += await asyncio.to_thread(_write_rows, writer, schema, pending)
        except pa.ArrowInvalid as error:
            raise ArchiveError(
                f"a row of {spec.table} cannot be archived exactly: {error}"
            ) from error
        finally:
            writer.close()
    return CorrectionFile(
        table=spec.table,
        path=spec.path,
        rows=rows,
        bytes=sink.bytes,
        sha256=sink.digest.hexdigest(),
    )


def _write_rows(writer: pq.ParquetWriter, schema: pa.Schema, rows: list[dict[str, object]]) -> int:
    if rows:
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return len(rows)


def correction_spec(entry: CorrectionFile) -> CorrectionTable | None:
    """The corrections table a manifest entry archives (None: not one this release knows)."""
    return next(
        (
            spec
            for spec in CORRECTION_TABLES
            if (spec.table, spec.path) == (entry.table, entry.path)
        ),
        None,
    )


async def live_differences(
    connection: Connection, month: date, entries: Sequence[CorrectionFile]
) -> list[str]:
    """The manifest's corrections rows against the live tables' rows of the month (an archive
    of an earlier release lists none: its month's corrections, if any, differ)."""
    found = []
    for spec in CORRECTION_TABLES:
        archived = next((e.rows for e in entries if e.table == spec.table), 0)
        live = await connection.fetchval(
            f"SELECT count(*) FROM {spec.table} WHERE {spec.of_month()}", *month_bounds(month)
        )
        if archived != live:
            found.append(f"{spec.table}: rows: {archived} in the archive, {live} in the table")
    return found


async def delete_corrections(
    connection: Connection, month: date, entries: Sequence[CorrectionFile]
) -> None:
    """Delete the month's archived corrections rows; inside the caller's transaction (the one
    that drops the month), and only when exactly the rows the archive holds were deleted."""
    if not connection.is_in_transaction():
        raise ArchiveError("the corrections are deleted in the transaction that drops the month")
    differences = []
    for spec in CORRECTION_TABLES:
        archived = next((e.rows for e in entries if e.table == spec.table), 0)
        status = await connection.execute(
            f"DELETE FROM {spec.table} WHERE {spec.of_month()}", *month_bounds(month)
        )
        deleted = int(status.split()[-1])
        if deleted != archived:
            differences.append(f"{spec.table}: {archived} rows archived, {deleted} in the table")
    if differences:  # raising rolls the deletion (and the drop) back
        raise ArchiveError(
            f"the corrections of {period_of(month)} changed since they were archived: "
            + "; ".join(differences)
            + "; nothing was deleted"
        )
