"""`/v1/tenants/{tenant_id}/usage/…`: a tenant's totals, breakdowns and daily series."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, timedelta
from typing import Annotated, Final

from fastapi import APIRouter, Query

from llm_usage.api.context import Context
from llm_usage.api.guards import Member, TenantId
from llm_usage.api.http import ERRORS
from llm_usage.api.models import (
    UsageBreakdownAnswer,
    UsageDailyAnswer,
    UsageSummaryAnswer,
    UsageTodayAnswer,
)
from llm_usage.api.params import rfc3339, time_range
from llm_usage.domain.periods import utc_day
from llm_usage.domain.report_days import midnight
from llm_usage.storage import usage_reports
from llm_usage.storage.pool import connection_from, snapshot_from
from llm_usage.storage.usage_dimensions import Dimension

MAX_DAYS: Final = 366
MAX_BREAKDOWN_ITEMS: Final = 1000

router = APIRouter(prefix="/v1/tenants/{tenant_id}/usage", tags=["usage"], responses=ERRORS)

From = Annotated[
    str | None,
    Query(alias="from", description="RFC 3339 or a date; default: this UTC month's start"),
]
To = Annotated[str | None, Query(description="RFC 3339 or a date; default: now")]


@router.get("/summary", summary="Totals over [from, to), and today's so far")
async def usage_summary(
    principal: Member,
    context: Context,
    tenant_id: TenantId,
    from_: From = None,
    to: To = None,
) -> UsageSummaryAnswer:
    now = context.clock()
    start, end = time_range(from_, to, now=now)
    today_start = midnight(utc_day(now))
    # One snapshot for both, so that today's figure never disagrees with the period's.
    async with snapshot_from(context.pool) as connection:
        summary = await usage_reports.usage_summary(
            connection, tenant_id, start=start, end=end, now=now
        )
        today = await usage_reports.usage_summary(
            connection, tenant_id, start=today_start, end=now, now=now
        )
    return UsageSummaryAnswer(
        tenant_id=tenant_id,
        from_=rfc3339(start),
        to=rfc3339(end),
        today=UsageTodayAnswer(from_=rfc3339(today_start), to=rfc3339(now), **asdict(today)),
        **asdict(summary),
    )


@router.get(
    "/breakdown",
    summary="Usage per deployment, model, provider, user, agent, channel or feature",
)
async def usage_breakdown(  # noqa: PLR0917 - FastAPI passes parameters by name
    principal: Member,
    context: Context,
    tenant_id: TenantId,
    by: Annotated[Dimension, Query(description="the attribute to group by")],
    from_: From = None,
    to: To = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_BREAKDOWN_ITEMS, description="at most this many items")
    ] = 100,
) -> UsageBreakdownAnswer:
    now = context.clock()
    start, end = time_range(from_, to, now=now)
    async with connection_from(context.pool) as connection:
        items = await usage_reports.usage_breakdown(
            connection, tenant_id, by=by, start=start, end=end, now=now, limit=limit
        )
    return UsageBreakdownAnswer(by=by, from_=rfc3339(start), to=rfc3339(end), items=items)


@router.get("/daily", summary="Requests and charge per UTC day, the last `days` days up to today")
async def usage_daily(
    principal: Member,
    context: Context,
    tenant_id: TenantId,
    days: Annotated[int, Query(ge=1, le=MAX_DAYS, description="days, today included")] = 30,
) -> UsageDailyAnswer:
    today = context.clock().astimezone(UTC).date()
    async with connection_from(context.pool) as connection:
        items = await usage_reports.usage_daily(
            connection, tenant_id, first_day=today - timedelta(days=days - 1), last_day=today
        )
    return UsageDailyAnswer(items=items)
