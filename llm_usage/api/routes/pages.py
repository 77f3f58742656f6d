"""`/ui/tenants/{tenant_id}`: the page for people, from the same reads as the API."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from llm_usage.api import ui
from llm_usage.api.context import Context
from llm_usage.api.guards import UI_TOKEN_COOKIE, PageMember, TenantId
from llm_usage.api.http import ERRORS
from llm_usage.storage import usage_reports
from llm_usage.storage.budget_status import tenant_budget_status
from llm_usage.storage.pool import connection_from
from llm_usage.storage.usage_dimensions import Dimension

router = APIRouter(tags=["ui"], responses=ERRORS)


@router.get(
    "/ui/tenants/{tenant_id}",
    response_class=HTMLResponse,
    summary="A page for people: budgets, the last 30 days, top models and users",
    description=(
        "HTML. The token comes as `Authorization: Bearer` or, from a browser, in the "
        f"`{UI_TOKEN_COOKIE}` cookie."
    ),
)
async def tenant_page(principal: PageMember, context: Context, tenant_id: TenantId) -> HTMLResponse:
    now = context.clock()
    start, end = ui.month_range(now)
    first_day, last_day = ui.daily_range(now)
    async with connection_from(context.pool) as connection:
        month = await usage_reports.usage_summary(connection, tenant_id, start=start, end=end)
        budgets = await tenant_budget_status(connection, tenant_id, now=now)
        daily = await usage_reports.usage_daily(
            connection, tenant_id, first_day=first_day.date(), last_day=last_day.date()
        )
        top = {
            by: await usage_reports.usage_breakdown(
                connection, tenant_id, by=by, start=start, end=end, limit=ui.TOP
            )
            for by in (Dimension.MODEL, Dimension.USER)
        }
    page = ui.render_page(
        tenant_id=tenant_id,
        now=now,
        month=month,
        budgets=budgets,
        daily=daily,
        models=top[Dimension.MODEL],
        users=top[Dimension.USER],
    )
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})
