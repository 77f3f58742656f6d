"""The schema stays distributable (docs/scaling.md), checked in the catalog of a plain PostgreSQL
migrated to the latest schema: every table has a place in the Citus plan, every unique key of a
distributed table contains its distribution column (tenant_id for the tenant-scoped tables), the
id window's key is exactly gateway_request_id, and no serial key goes without tenant_id."""

from __future__ import annotations

import asyncpg

from llm_usage.storage.distribution import DISTRIBUTED, LOCAL, REFERENCE

# Every table migrations create (partitions are their parent's): name, its unique keys (primary
# keys, unique constraints and unique indexes) as column lists, and its serial columns.
_TABLES = """
    SELECT c.relname AS table_name,
        coalesce(array_agg(DISTINCT (
            SELECT string_agg(a.attname, ',' ORDER BY k.ord)
            FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
            JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum = k.attnum
            WHERE k.ord <= i.indnkeyatts
        )) FILTER (WHERE i.indexrelid IS NOT NULL), '{}') AS unique_keys,
        coalesce((
            SELECT array_agg(a.attname::text) FROM pg_attribute AS a
            WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              AND (a.attidentity <> '' OR pg_get_serial_sequence(c.oid::regclass::text,
                                                                 a.attname) IS NOT NULL)
        ), '{}') AS serial_columns
    FROM pg_class AS c
    JOIN pg_namespace AS n ON n.oid = c.relnamespace AND n.nspname = current_schema()
    LEFT JOIN pg_index AS i ON i.indrelid = c.oid AND i.indisunique
    WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
    GROUP BY c.oid, c.relname
"""


async def _catalog(pool: asyncpg.Pool) -> dict[str, tuple[list[list[str]], list[str]]]:
    return {
        row["table_name"]: (
            [key.split(",") for key in row["unique_keys"]],
            list(row["serial_columns"]),
        )
        for row in await pool.fetch(_TABLES)
    }


async def test_every_table_of_the_schema_has_a_place_in_the_distribution_plan(
    pool: asyncpg.Pool,
) -> None:
    planned = {p.table for p in DISTRIBUTED} | {r.table for r in REFERENCE} | set(LOCAL)
    tables = set(await _catalog(pool))
    assert tables - planned == set(), "add them to llm_usage/storage/distribution.py"
    assert planned - tables == set(), "the plan names tables the schema no longer has"


async def test_every_unique_key_of_a_distributed_table_contains_its_distribution_column(
    pool: asyncpg.Pool,
) -> None:
    catalog = await _catalog(pool)
    for plan in DISTRIBUTED:
        unique_keys, serial_columns = catalog[plan.table]
        for key in unique_keys:
            assert plan.column in key, f"{plan.table}: unique key {key} lacks {plan.column}"
        for column in serial_columns:  # a serial key alone would be unique without it
            assert all(column not in key or plan.column in key for key in unique_keys), (
                f"{plan.table}.{column} is serial: a key on it must contain {plan.column}"
            )


async def test_the_id_window_is_keyed_on_the_id_alone(pool: asyncpg.Pool) -> None:
    unique_keys, serial_columns = (await _catalog(pool))["usage_event_ids"]
    assert unique_keys == [["gateway_request_id"]]
    assert serial_columns == []
