"""`/ui/tenants/{tenant_id}/events`: the drill-down page for people, from the API's own read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from llm_usage.api import ui_events
from llm_usage.api.context import Context
from llm_usage.api.event_cursors import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    encode_cursor,
    event_query,
)
from llm_usage.api.guards import UI_TOKEN_COOKIE, PageMember, TenantId
from llm_usage.api.http import ERRORS
from llm_usage.api.params import rfc3339
from llm_usage.storage.pool import connection_from
from llm_usage.storage.usage_event_pages import usage_event_page

router = APIRouter(tags=["ui"], responses=ERRORS)

# An empty field (a form left blank) means the parameter is absent.
Text = Annotated[str | None, Query()]


def _given(value: str | None) -> str | None:
    return value or None


@router.get(
    "/ui/tenants/{tenant_id}/events",
    response_class=HTMLResponse,
    summary="A page for people: the tenant's events, newest first, filtered, a page at a time",
    description=(
        "HTML, from the same read as `GET /v1/tenants/{tenant_id}/usage/events`. Filters, range, "
        "`limit` and `cursor` as there; `before` is the page's own link back to newer events. "
        "The token comes as `Authorization: Bearer` or, from a browser, in the "
        f"`{UI_TOKEN_COOKIE}` cookie."
    ),
)
async def events_page(  # noqa: PLR0917 - FastAPI passes parameters by name
    principal: PageMember,
    context: Context,
    tenant_id: TenantId,
    user_id: Text = None,
    agent_id: Text = None,
    deployment_id: Text = None,
    model: Text = None,
    from_: Annotated[str | None, Query(alias="from")] = None,
    to: Text = None,
    cursor: Text = None,
    before: Text = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="events a page")] = DEFAULT_LIMIT,
) -> HTMLResponse:
    filters = {
        "user_id": _given(user_id),
        "agent_id": _given(agent_id),
        "deployment_id": _given(deployment_id),
        "model": _given(model),
    }
    query = event_query(
        now=context.clock(),
        from_text=_given(from_),
        to_text=_given(to),
        filters=filters,
        limit=limit,
        cursor=_given(cursor),
        before=_given(before),
    )
    async with connection_from(context.pool) as connection:
        page = await usage_event_page(connection, tenant_id, query)
    # The links keep the range fixed, so that paging back and forth sees the same events even
    # while new ones arrive (`to` defaults to now).
    kept = {**filters, "from": rfc3339(query.start), "to": rfc3339(query.end)}
    if limit != DEFAULT_LIMIT:
        kept["limit"] = str(limit)
    reading_newer = query.before is not None
    newer_exist = page.more if reading_newer else query.after is not None
    older_exist = query.before is not None or page.more
    newer = (
        ui_events.events_url(tenant_id, {**kept, "before": encode_cursor(page.first)})
        if newer_exist and page.first is not None
        else None
    )
    older = (
        ui_events.events_url(tenant_id, {**kept, "cursor": encode_cursor(page.last)})
        if older_exist and page.last is not None
        else None
    )
    html = ui_events.render_events_page(
        tenant_id=tenant_id,
        events=page.items,
        filters=query.filters,
        query=kept,
        start=query.start,
        end=query.end,
        newer=newer,
        older=older,
    )
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})
