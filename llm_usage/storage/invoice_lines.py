"""Invoice lines, closed months and the monthly usage the rollup bills, read from the daily
pre-aggregate (never from the raw events)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date
from typing import Any, NamedTuple

import asyncpg

from llm_usage.domain.invoices import InvoiceLine
from llm_usage.domain.periods import parse_period, period_of
from llm_usage.domain.usage import Usage
from llm_usage.storage.pool import Connection
from llm_usage.storage.usage_totals import lock_month_exclusively

# One rollup or close at a time, per database: a run replaces an open month's lines whole.
ROLLUP_LOCK_KEY = 0x6C6C6D5F726F6C6C

# `original_period` is stored for the index; a line derives it from its meta.
LINE_COLUMNS = (
    "tenant_id",
    "period",
    "deployment_id",
    "kind",
    "resource_kind",
    "unit",
    "unit_price_cents",
    "qty",
    "amount_cents",
    "description",
    "meta",
    "original_period",
)


# What a month's usage query gives per group: (tenant_id, deployment_id, exact totals).
GroupUsage = tuple[str, str | None, Usage]


_READ_COLUMNS = tuple(column for column in LINE_COLUMNS if column != "original_period")


async def lock_rollup(connection: Connection) -> None:
    """Serialise rollup runs and closes for the rest of the transaction."""
    await connection.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK_KEY)


async def tenants_with_usage(
    connection: Connection, *, first_day: date, next_month: date
) -> list[str]:
    """The tenants with any usage in [first_day, next_month), in the database's order of
    tenant_id: consecutive ones make a `TenantRange` that holds no other tenant with usage."""
    rows = await connection.fetch(
        "SELECT DISTINCT tenant_id FROM usage_daily_totals WHERE day >= $1 AND day < $2 "
        "ORDER BY tenant_id",
        first_day,
        next_month,
    )
    return [row["tenant_id"] for row in rows]


# The tenants of one step of a run: from the first to the last, both included, in the
# database's order of tenant_id (the order `tenants_with_usage` gives).
TenantRange = tuple[str, str]

_MONTHLY_USAGE = """
    SELECT tenant_id, deployment_id, sum(charge_usd) AS charge_usd,
           sum(input_tokens)::bigint AS input_tokens,
           sum(output_tokens)::bigint AS output_tokens, sum(requests)::bigint AS requests,
           sum(estimated_charge_usd) AS estimated_charge_usd
    FROM usage_daily_totals
    WHERE day >= $1 AND day < $2 {tenants}
    GROUP BY tenant_id, deployment_id
"""
# A range on the key's leading column, and never "$3 IS NULL OR ...": asyncpg keeps the
# statement prepared, and from its sixth execution on a connection (what `rollup schedule` does,
# run after run) PostgreSQL may plan it generically, without the parameters' values. The range
# stays one index range scan in that plan; "$3 IS NULL OR" scanned the whole month for every
# step (130-155 s for a month of 10,000 tenants); "= ANY($3)" kept the index too, on a guess of
# the array's length (BENCHMARKS.md, "monthly_usage").
_MONTHLY_USAGE_IN_RANGE = _MONTHLY_USAGE.format(tenants="AND tenant_id >= $3 AND tenant_id <= $4")
_MONTHLY_USAGE_ALL = _MONTHLY_USAGE.format(tenants="")


def _usage_of(row: asyncpg.Record) -> Usage:
    return Usage(
        row["charge_usd"],
        row["input_tokens"],
        row["output_tokens"],
        row["requests"],
        row["estimated_charge_usd"],
    )


async def monthly_usage(
    connection: Connection,
    *,
    first_day: date,
    next_month: date,
    tenants: TenantRange | None,
) -> list[GroupUsage]:
    """Exact usage per tenant and deployment over [first_day, next_month), from daily totals,
    for the tenants from `tenants[0]` to `tenants[1]` (both included; all when None)."""
    if tenants is None:
        rows = await connection.fetch(_MONTHLY_USAGE_ALL, first_day, next_month)
    else:
        rows = await connection.fetch(_MONTHLY_USAGE_IN_RANGE, first_day, next_month, *tenants)
    return [
        (
            row["tenant_id"],
            row["deployment_id"],
            _usage_of(row),
        )
        for row in rows
    ]


async def closed_period(connection: Connection, period: str) -> bool:
    """Whether the month `period` (YYYY-MM) is closed: its invoice lines are final."""
    found = await connection.fetchval("SELECT true FROM invoice_periods WHERE period = $1", period)
    return bool(found)


async def closed_periods(connection: Connection) -> dict[str, Any]:
    """Closed months and when each was closed."""
    rows = await connection.fetch("SELECT period, closed_at FROM invoice_periods")
    return {row["period"]: row["closed_at"] for row in rows}


# A (tenant, closed month) the usage consumer added usage to after the month was closed, and how
# many batches did (a batch that marks it again changes `batches`).
class LateMark(NamedTuple):
    tenant_id: str
    period: str
    batches: int


async def late_marks(connection: Connection, *, tenant_id: str | None = None) -> list[LateMark]:
    """The marks of late usage not yet billed in a closed month (of one tenant, or all)."""
    rows = await connection.fetch(
        "SELECT tenant_id, period, batches FROM usage_late_marks "
        "WHERE ($1::text IS NULL OR tenant_id = $1) ORDER BY period, tenant_id",
        tenant_id,
    )
    return [LateMark(row["tenant_id"], row["period"], row["batches"]) for row in rows]


async def forget_late_marks(connection: Connection, marks: Sequence[LateMark]) -> int:
    """Delete the marks a closed month's lines have billed, unless a batch marked one again since
    it was read (its late usage may not be in those lines); return how many were deleted."""
    if not marks:
        return 0
    status = await connection.execute(
        "DELETE FROM usage_late_marks AS m "
        "USING unnest($1::text[], $2::text[], $3::bigint[]) AS d(tenant_id, period, batches) "
        "WHERE m.tenant_id = d.tenant_id AND m.period = d.period AND m.batches = d.batches",
        [mark.tenant_id for mark in marks],
        [mark.period for mark in marks],
        [mark.batches for mark in marks],
    )
    return int(status.rsplit(" ", 1)[-1])


async def lock_month_for_close(connection: Connection, period: str) -> None:
    """Hold the month's lock exclusively for the rest of the transaction: usage batches adding to
    the month wait, and the ones under way have committed once it is held."""
    await lock_month_exclusively(connection, parse_period(period))


async def usage_of_tenants(
    connection: Connection, *, first_day: date, next_month: date, tenants: Sequence[str]
) -> list[GroupUsage]:
    """Exact usage per tenant and deployment over [first_day, next_month) of these tenants."""
    rows = await connection.fetch(
        _MONTHLY_USAGE.format(tenants="AND tenant_id = ANY($3::text[])"),
        first_day,
        next_month,
        list(tenants),
    )
    return [
        (
            row["tenant_id"],
            row["deployment_id"],
            _usage_of(row),
        )
        for row in rows
    ]


async def closed_lines_billing(
    connection: Connection, *, original_period: str, tenants: Sequence[str]
) -> list[InvoiceLine]:
    """Lines of closed months that bill `original_period`'s usage of these tenants."""
    rows = await connection.fetch(
        f"""
        SELECT {", ".join(_READ_COLUMNS)}, true AS closed
        FROM invoice_lines l
        WHERE l.tenant_id = ANY($1::text[]) AND l.original_period = $2
          AND EXISTS (SELECT 1 FROM invoice_periods p WHERE p.period = l.period)
        """,
        list(tenants),
        original_period,
    )
    return [_line(row) for row in rows]


async def lines_for(
    connection: Connection,
    *,
    period: str | None = None,
    original_periods: Sequence[str] | None = None,
    tenant_id: str | None = None,
    closed_only: bool = False,
) -> list[InvoiceLine]:
    """Stored lines billed in `period`, or billing any of `original_periods`, each saying
    whether its month is closed."""
    rows = await connection.fetch(
        f"""
        SELECT {", ".join(_READ_COLUMNS)},
            EXISTS (SELECT 1 FROM invoice_periods p WHERE p.period = l.period) AS closed
        FROM invoice_lines l
        WHERE ($1::text IS NULL OR l.period = $1)
          AND ($2::text[] IS NULL OR l.original_period = ANY($2::text[]))
          AND ($3::text IS NULL OR l.tenant_id = $3)
          AND (NOT $4 OR EXISTS (SELECT 1 FROM invoice_periods p WHERE p.period = l.period))
        ORDER BY l.tenant_id, l.kind, l.original_period, l.deployment_id NULLS FIRST
        """,
        period,
        list(original_periods) if original_periods is not None else None,
        tenant_id,
        closed_only,
    )
    return [_line(row) for row in rows]


def _line(row: asyncpg.Record) -> InvoiceLine:
    values = dict(row)
    values["meta"] = json.loads(values["meta"])
    return InvoiceLine(**values)


async def replace_open_lines(
    connection: Connection,
    *,
    period: str,
    tenant_id: str | None,
    lines: Sequence[InvoiceLine],
) -> None:
    """Replace the open month's lines (of one tenant, or all) with `lines`; the database refuses
    it for a closed month."""
    await connection.execute(
        "DELETE FROM invoice_lines WHERE period = $1 AND ($2::text IS NULL OR tenant_id = $2)",
        period,
        tenant_id,
    )
    if lines:
        await connection.copy_records_to_table(
            "invoice_lines",
            columns=list(LINE_COLUMNS),
            records=[
                tuple(
                    json.dumps(line.meta, sort_keys=True) if column == "meta" else value
                    for column, value in zip(
                        LINE_COLUMNS, (getattr(line, c) for c in LINE_COLUMNS), strict=True
                    )
                )
                for line in lines
            ],
        )


async def close_period(connection: Connection, period: str) -> bool:
    """Mark the month closed; False if it already was."""
    status = await connection.execute(
        "INSERT INTO invoice_periods (period) VALUES ($1) ON CONFLICT DO NOTHING", period
    )
    return status.endswith(" 1")


async def first_month_with_usage_before(
    connection: Connection, period_first_day: date
) -> str | None:
    """The first month before `period_first_day` that has usage (one descent of the day index)."""
    first: date | None = await connection.fetchval(
        "SELECT min(day) FROM usage_daily_totals WHERE day < $1", period_first_day
    )
    return None if first is None else period_of(first)
