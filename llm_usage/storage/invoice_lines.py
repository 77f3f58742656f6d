"""Invoice lines, closed months and the monthly usage the rollup bills, read from the daily
pre-aggregate (never from the raw events)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date
from typing import Any

import asyncpg

from llm_usage.domain.invoices import InvoiceLine
from llm_usage.domain.usage import Usage
from llm_usage.storage.pool import Connection

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
           sum(output_tokens)::bigint AS output_tokens, sum(requests)::bigint AS requests
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
            Usage(row["charge_usd"], row["input_tokens"], row["output_tokens"], row["requests"]),
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


async def periods_with_late_usage(connection: Connection, *, margin_seconds: int) -> list[str]:
    """Closed months whose daily totals changed after (or just before) they were closed: the
    only ones that can need a true-up. The margin covers a batch that wrote before the close
    but committed after it."""
    rows = await connection.fetch(
        """
        SELECT p.period FROM invoice_periods p
        WHERE EXISTS (
            SELECT 1 FROM usage_daily_totals t
            WHERE t.day >= to_date(p.period, 'YYYY-MM')
              AND t.day < (to_date(p.period, 'YYYY-MM') + interval '1 month')::date
              AND t.updated_at > p.closed_at - make_interval(secs => $1)
        )
        ORDER BY p.period
        """,
        margin_seconds,
    )
    return [row["period"] for row in rows]


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


async def months_with_usage_before(connection: Connection, period_first_day: date) -> list[str]:
    """Months before `period_first_day` that have usage, oldest first."""
    rows = await connection.fetch(
        "SELECT DISTINCT to_char(day, 'YYYY-MM') AS period FROM usage_daily_totals "
        "WHERE day < $1 ORDER BY 1",
        period_first_day,
    )
    return [row["period"] for row in rows]
