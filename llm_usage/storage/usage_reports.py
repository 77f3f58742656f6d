"""Reads behind the HTTP API's usage reports: a tenant's totals, breakdowns and daily series.

Every report reads the exact per-attribute daily aggregate (`usage_daily_dimensions`, kept in
the usage consumer's own transaction) for the whole UTC days of its range, and raw events only
for the days the range cuts (domain/report_days.py says how): its cost does not grow with the
tenant's events. One statement per report; every query is parameterised, and column names come
only from the fixed table of dimensions. Sums are exact (`numeric`); counts are `bigint`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from llm_usage.domain.report_days import RawPiece, read_plan
from llm_usage.storage.pool import Connection
from llm_usage.storage.usage_dimensions import Dimension


@dataclass(frozen=True)
class UsageSummary:
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    total_tokens: int
    customer_charge_usd: Decimal
    estimated_charge_usd: Decimal


@dataclass(frozen=True)
class BreakdownItem:
    key: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    total_tokens: int
    customer_charge_usd: Decimal
    estimated_charge_usd: Decimal


@dataclass(frozen=True)
class DailyItem:
    day: date
    requests: int
    customer_charge_usd: Decimal
    estimated_charge_usd: Decimal


# The range's parts, each row signed: the aggregate's rows of the dimension ($2) over the days
# [$3, $4), and per raw piece ($5/$6/$7, $8/$9/$10: start, end, sign; null start and end for
# none) the events' sums per `{key}`, grouped by `{group}`. $1 is the tenant. Raw pieces read
# the covering index of migration 0009 alone.
_RAW_PIECE = """
    SELECT {key} AS key, ${sign}::int * count(*) AS requests,
           ${sign}::int * sum(input_tokens) AS input_tokens,
           ${sign}::int * sum(output_tokens) AS output_tokens,
           ${sign}::int * sum(cached_input_tokens) AS cached_input_tokens,
           ${sign}::int * sum(reasoning_tokens) AS reasoning_tokens,
           ${sign}::int * sum(total_tokens) AS total_tokens,
           ${sign}::int * sum(customer_charge_usd) AS charge_usd,
           0::numeric AS estimated_charge_usd
    FROM llm_usage_events
    WHERE tenant_id = $1 AND occurred_at >= ${start} AND occurred_at < ${end}
    {group}
"""
# A raw piece's estimated charge. `charge_estimated` is not in the covering index, so reading it
# costs a heap page per event of the piece: the uncorrelated subquery (a one-time filter,
# evaluated once) skips the scan unless the aggregate says the piece's days (a piece never
# crosses a UTC day; a null piece has none) hold an estimated charge at all.
_ESTIMATED_PIECE = """
    SELECT {key} AS key, 0::bigint AS requests, 0::bigint AS input_tokens,
           0::bigint AS output_tokens, 0::bigint AS cached_input_tokens,
           0::bigint AS reasoning_tokens, 0::bigint AS total_tokens, 0::numeric AS charge_usd,
           ${sign}::int * sum(customer_charge_usd) AS estimated_charge_usd
    FROM llm_usage_events
    WHERE tenant_id = $1 AND occurred_at >= ${start} AND occurred_at < ${end}
      AND charge_estimated
      AND (SELECT coalesce(sum(estimated_charge_usd), 0) <> 0
           FROM usage_daily_dimensions
           WHERE tenant_id = $1 AND dimension = 'deployment'
             AND day = (${start}::timestamptz AT TIME ZONE 'UTC')::date)
    {group}
"""
_PARTS = """
    SELECT key, requests, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens,
           total_tokens, charge_usd, estimated_charge_usd
    FROM usage_daily_dimensions
    WHERE tenant_id = $1 AND dimension = $2 AND day >= $3 AND day < $4
    UNION ALL {first}
    UNION ALL {second}
    UNION ALL {first_estimated}
    UNION ALL {second_estimated}
"""
_SUMS = """
    coalesce(sum(requests), 0)::bigint AS requests,
    coalesce(sum(input_tokens), 0)::bigint AS input_tokens,
    coalesce(sum(output_tokens), 0)::bigint AS output_tokens,
    coalesce(sum(cached_input_tokens), 0)::bigint AS cached_input_tokens,
    coalesce(sum(reasoning_tokens), 0)::bigint AS reasoning_tokens,
    coalesce(sum(total_tokens), 0)::bigint AS total_tokens,
    coalesce(sum(charge_usd), 0) AS customer_charge_usd,
    coalesce(sum(estimated_charge_usd), 0) AS estimated_charge_usd
"""


def _parts(key: str, group: str) -> str:
    pieces = [{"start": 5, "end": 6, "sign": 7}, {"start": 8, "end": 9, "sign": 10}]
    raw = [_RAW_PIECE.format(key=key, group=group, **piece) for piece in pieces]
    estimated = [_ESTIMATED_PIECE.format(key=key, group=group, **piece) for piece in pieces]
    return _PARTS.format(
        first=raw[0], second=raw[1], first_estimated=estimated[0], second_estimated=estimated[1]
    )


# Every event is in exactly one row of the `deployment` dimension: their sum is the total. The
# raw pieces need no grouping (an aggregate without GROUP BY: one row, null sums when empty).
SUMMARY_QUERY = f"SELECT {_SUMS} FROM ({_parts('NULL::text', '')}) AS parts"


def breakdown_query(by: Dimension) -> str:
    """The breakdown; $1 tenant, $2 dimension, $3-$10 the read plan's parts, $11 limit."""
    parts = _parts(by.column, f"GROUP BY {by.column}")
    return f"""
        SELECT key, {_SUMS} FROM ({parts}) AS parts
        GROUP BY key
        HAVING sum(requests) <> 0
        ORDER BY customer_charge_usd DESC, requests DESC, key ASC NULLS FIRST
        LIMIT $11
    """


def _plan_arguments(start: datetime, end: datetime, now: datetime) -> list[Any]:
    """$3-$10 of the queries above: the aggregate's days and two raw pieces (or none)."""
    plan = read_plan(start, end, now=now)
    pieces: list[RawPiece | None] = [*plan.raw, None, None][:2]
    arguments: list[Any] = [plan.first_day, plan.end_day]
    for piece in pieces:
        arguments += [None, None, 0] if piece is None else [piece.start, piece.end, piece.sign]
    return arguments


async def usage_summary(
    connection: Connection, tenant_id: str, *, start: datetime, end: datetime, now: datetime
) -> UsageSummary:
    """Totals over the tenant's events with start <= occurred_at < end (`now`, the current
    instant, only chooses how they are read)."""
    row = await connection.fetchrow(
        SUMMARY_QUERY, tenant_id, Dimension.DEPLOYMENT.value, *_plan_arguments(start, end, now)
    )
    assert row is not None  # an aggregate without GROUP BY always answers one row
    return UsageSummary(**dict(row))


async def usage_breakdown(
    connection: Connection,
    tenant_id: str,
    *,
    by: Dimension,
    start: datetime,
    end: datetime,
    now: datetime,
    limit: int,
) -> list[BreakdownItem]:
    """The tenant's usage per value of `by` (null is one value of its own) over its events with
    start <= occurred_at < end, highest charge first (then most requests, then by key, null
    first), at most `limit` items (`now` as in `usage_summary`)."""
    rows = await connection.fetch(
        breakdown_query(by), tenant_id, by.value, *_plan_arguments(start, end, now), limit
    )
    return [BreakdownItem(**dict(row)) for row in rows]


# Whole UTC days from the aggregate alone: the sum of a day's `deployment` rows is its usage.
_DAILY = """
    SELECT day, sum(requests)::bigint AS requests, sum(charge_usd) AS customer_charge_usd,
           sum(estimated_charge_usd) AS estimated_charge_usd
    FROM usage_daily_dimensions
    WHERE tenant_id = $1 AND dimension = 'deployment' AND day >= $2 AND day <= $3
    GROUP BY day
"""


async def usage_daily(
    connection: Connection, tenant_id: str, *, first_day: date, last_day: date
) -> list[DailyItem]:
    """One item per UTC day from `first_day` to `last_day` (both included), oldest first;
    days without usage are there with zeros."""
    rows = await connection.fetch(_DAILY, tenant_id, first_day, last_day)
    found = {row["day"]: row for row in rows}
    items = []
    day = first_day
    while day <= last_day:
        row = found.get(day)
        items.append(
            DailyItem(
                day, int(row["requests"]), row["customer_charge_usd"], row["estimated_charge_usd"]
            )
            if row is not None
            else DailyItem(day, 0, Decimal(0), Decimal(0))
        )
        day += timedelta(days=1)
    return items


_ALERTS = """
    SELECT payload FROM budget_alert_outbox
    WHERE tenant_id = $1 AND published_at IS NOT NULL
      AND ($2::timestamptz IS NULL OR created_at >= $2)
    ORDER BY created_at DESC, seq DESC
    LIMIT $3
"""


async def emitted_alerts(
    connection: Connection, tenant_id: str, *, since: datetime | None, limit: int
) -> list[dict[str, Any]]:
    """The tenant's budget alerts that were published to the alerts topic (decided at or after
    `since`), newest first, each exactly as published."""
    rows = await connection.fetch(_ALERTS, tenant_id, since, limit)
    return [json.loads(row["payload"]) for row in rows]
