"""`/ui/tenants/{tenant_id}`: the page for people, from the same reads as the API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from llm_usage.api import ui, ui_events
from llm_usage.api.auth import Role
from llm_usage.api.context import Context
from llm_usage.api.guards import UI_TOKEN_COOKIE, UI_TOKEN_PARAMETER, SignInPageMember, TenantId
from llm_usage.api.http import ERRORS
from llm_usage.domain.periods import current_period
from llm_usage.storage import usage_reports
from llm_usage.storage.budget_status import tenant_budget_status
from llm_usage.storage.invoice_lines import lines_for
from llm_usage.storage.pool import snapshot_from
from llm_usage.storage.usage_dimensions import Dimension

router = APIRouter(tags=["ui"], responses=ERRORS)


@router.get(
    "/ui/tenants/{tenant_id}",
    response_class=HTMLResponse,
    summary=(
        "A page for people: today and this month, budgets, the last 30 days, top models, users "
        "and agents, this month's alerts and (for tenant admins) its preview invoice lines"
    ),
    description=(
        "HTML. The token comes as `Authorization: Bearer` or, from a browser, in the "
        f"`{UI_TOKEN_COOKIE}` cookie. A link with `?{UI_TOKEN_PARAMETER}=<JWT>` signs a browser "
        "in: a valid token there is answered with that cookie and a redirect to the page "
        "without it (an empty one is ignored). Other pages ignore the parameter."
    ),
)
async def tenant_page(
    principal: SignInPageMember,
    context: Context,
    tenant_id: TenantId,
    request: Request,
    token: Annotated[
        str | None,
        Query(
            alias=UI_TOKEN_PARAMETER,
            description="a JWT to keep in the page's cookie (a sign-in link, for development)",
        ),
    ] = None,
) -> Response:
    if token and "authorization" not in request.headers:
        # Without a header the guard checked this token: keep it in the cookie, and take it out
        # of the address bar. Not `request.url.path`: that is decoded, so a tenant id holding
        # `%41` would lead to the page of the tenant whose id holds `A`.
        signed_in = RedirectResponse(ui_events.tenant_page_url(tenant_id), status_code=303)
        signed_in.set_cookie(
            UI_TOKEN_COOKIE,
            token,
            path="/ui",
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )
        return signed_in
    now = context.clock()
    start, end = ui.month_range(now)
    today_start, _ = ui.today_range(now)
    first_day, last_day = ui.daily_range(now)
    # Members read usage and budgets; invoice lines are for tenant admins (the contract).
    sees_lines = principal.may(Role.TENANT_ADMIN, tenant_id)
    # One snapshot for every section, so that the month's figure, its top lists and its
    # invoice lines agree with each other even while events arrive.
    async with snapshot_from(context.pool) as connection:
        month = await usage_reports.usage_summary(
            connection, tenant_id, start=start, end=end, now=now
        )
        today = await usage_reports.usage_summary(
            connection, tenant_id, start=today_start, end=end, now=now
        )
        budgets = await tenant_budget_status(connection, tenant_id, now=now)
        daily = await usage_reports.usage_daily(
            connection, tenant_id, first_day=first_day.date(), last_day=last_day.date()
        )
        top = {
            by: await usage_reports.usage_breakdown(
                connection, tenant_id, by=by, start=start, end=end, now=now, limit=ui.TOP
            )
            for by in (Dimension.MODEL, Dimension.USER, Dimension.AGENT)
        }
        alerts = await usage_reports.emitted_alerts(
            connection, tenant_id, since=start, limit=ui.ALERTS
        )
        lines = (
            await lines_for(connection, period=current_period(now), tenant_id=tenant_id)
            if sees_lines
            else None
        )
    page = ui.render_page(
        ui.TenantPage(
            tenant_id=tenant_id,
            now=now,
            today=today,
            month=month,
            budgets=budgets,
            daily=daily,
            models=top[Dimension.MODEL],
            users=top[Dimension.USER],
            agents=top[Dimension.AGENT],
            alerts=alerts,
            invoice_lines=lines,
        )
    )
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})
