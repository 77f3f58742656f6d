"""Reads behind the HTTP API's usage reports: a tenant's totals, breakdowns and daily series.

Where a report's range is made of whole UTC days and the daily pre-aggregate
(`usage_daily_totals`, kept exact in the usage consumer's own transaction) has the numbers it
needs, the report reads that; otherwise it reads the raw events through the index on
(tenant_id, occurred_at). Every query is parameterised; column names come only from the fixed
table of dimensions below. Sums are exact (`numeric`); counts are `bigint`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final

from llm_usage.storage.pool import Connection


class Dimension(StrEnum):
    """What a breakdown groups by, and the event column that holds it."""

    DEPLOYMENT = "deployment"
    MODEL = "model"
    PROVIDER = "provider"
    USER = "user"
    AGENT = "agent"
    CHANNEL = "channel"
    FEATURE = "feature"

    @property
    def column(self) -> str:
        return _COLUMNS[self]


_COLUMNS: Final = {
    Dimension.DEPLOYMENT: "deployment_id",
    Dimension.MODEL: "model",
    Dimension.PROVIDER: "provider",
    Dimension.USER: "user_id",
    Dimension.AGENT: "agent_id",
    Dimension.CHANNEL: "channel",
    Dimension.FEATURE: "feature",
}


@dataclass(frozen=True)
class UsageSummary:
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    total_tokens: int
    customer_charge_usd: Decimal


@dataclass(frozen=True)
class BreakdownItem:
    key: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    customer_charge_usd: Decimal


@dataclass(frozen=True)
class DailyItem:
    day: date
    requests: int
    customer_charge_usd: Decimal


def whole_day(moment: datetime) -> date | None:
    """The UTC day `moment` starts, if it is a UTC midnight; else None."""
    utc = moment.astimezone(UTC)
    return utc.date() if utc.timetz().replace(tzinfo=None) == time(0) else None


# The summary needs cached, reasoning and total tokens, which the daily pre-aggregate does not
# keep: it reads the events, from the covering index of migration 0005 alone.
SUMMARY_QUERY = """
    SELECT count(*) AS requests,
           coalesce(sum(input_tokens), 0)::bigint AS input_tokens,
           coalesce(sum(output_tokens), 0)::bigint AS output_tokens,
           coalesce(sum(cached_input_tokens), 0)::bigint AS cached_input_tokens,
           coalesce(sum(reasoning_tokens), 0)::bigint AS reasoning_tokens,
           coalesce(sum(total_tokens), 0)::bigint AS total_tokens,
           coalesce(sum(customer_charge_usd), 0) AS customer_charge_usd
    FROM llm_usage_events
    WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3
"""


async def usage_summary(
    connection: Connection, tenant_id: str, *, start: datetime, end: datetime
) -> UsageSummary:
    """Totals over the tenant's events with start <= occurred_at < end."""
    row = await connection.fetchrow(SUMMARY_QUERY, tenant_id, start, end)
    assert row is not None  # an aggregate without GROUP BY always answers one row
    return UsageSummary(**dict(row))


_ORDER_AND_LIMIT = """
    ORDER BY customer_charge_usd DESC, requests DESC, key ASC NULLS FIRST
    LIMIT $4
"""
# The `key` column of the events, by name from the fixed table above (never from input). Every
# column it reads is in the covering index of migration 0005.
_BREAKDOWN_EVENTS = """
    SELECT {column} AS key, count(*) AS requests,
           sum(input_tokens)::bigint AS input_tokens,
           sum(output_tokens)::bigint AS output_tokens,
           sum(customer_charge_usd) AS customer_charge_usd
    FROM llm_usage_events
    WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3
    GROUP BY {column}
"""
_BREAKDOWN_DAILY_DEPLOYMENTS = """
    SELECT deployment_id AS key, sum(requests)::bigint AS requests,
           sum(input_tokens)::bigint AS input_tokens,
           sum(output_tokens)::bigint AS output_tokens,
           sum(charge_usd) AS customer_charge_usd
    FROM usage_daily_totals
    WHERE tenant_id = $1 AND day >= $2 AND day < $3
    GROUP BY deployment_id
"""


def breakdown_query(by: Dimension) -> str:
    """The breakdown over raw events; $1 tenant, $2 start, $3 end, $4 limit."""
    return _BREAKDOWN_EVENTS.format(column=by.column) + _ORDER_AND_LIMIT


async def usage_breakdown(
    connection: Connection,
    tenant_id: str,
    *,
    by: Dimension,
    start: datetime,
    end: datetime,
    limit: int,
) -> list[BreakdownItem]:
    """The tenant's usage per value of `by` (null is one value of its own), highest charge
    first (then most requests, then by key, null first), at most `limit` items."""
    first_day, end_day = whole_day(start), whole_day(end)
    if by is Dimension.DEPLOYMENT and first_day is not None and end_day is not None:
        query = _BREAKDOWN_DAILY_DEPLOYMENTS + _ORDER_AND_LIMIT
        rows = await connection.fetch(query, tenant_id, first_day, end_day, limit)
    else:
        query = breakdown_query(by)
        rows = await connection.fetch(query, tenant_id, start, end, limit)
    return [BreakdownItem(**dict(row)) for row in rows]


_DAILY = """
    SELECT day, sum(requests)::bigint AS requests, sum(charge_usd) AS customer_charge_usd
    FROM usage_daily_totals
    WHERE tenant_id = $1 AND day >= $2 AND day <= $3
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
            DailyItem(day, int(row["requests"]), row["customer_charge_usd"])
            if row is not None
            else DailyItem(day, 0, Decimal(0))
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
