"""`/v1/tenants/{tenant_id}/usage/events`: the drill-down to the events themselves."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from llm_usage.api.context import Context
from llm_usage.api.event_cursors import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    encode_cursor,
    event_query,
)
from llm_usage.api.event_models import UsageEventsAnswer
from llm_usage.api.guards import Member, TenantId
from llm_usage.api.http import ERRORS
from llm_usage.api.routes.usage import From, To
from llm_usage.storage.pool import connection_from
from llm_usage.storage.usage_event_pages import usage_event_page

router = APIRouter(prefix="/v1/tenants/{tenant_id}/usage", tags=["usage"], responses=ERRORS)

Equal = Annotated[
    str | None, Query(description="only events whose (effective) attribute equals this")
]


@router.get(
    "/events",
    summary="The events themselves, newest first, a keyset page at a time",
    description=(
        "Every stored field of each event with `from <= occurred_at < to`, newest first (by "
        "`occurred_at`, then `gateway_request_id`, both descending), matching every filter given. "
        "`next_cursor` fetches the next, older page: pass it back with the same filters; it is "
        "null on the last page. Each event has its stored values and `effective`, what it counts "
        "for now (`corrected`: a correction applies; a voided event counts for nothing). The "
        "filters on user, agent and deployment match the effective ones."
    ),
)
async def usage_events(  # noqa: PLR0917 - FastAPI passes parameters by name
    principal: Member,
    context: Context,
    tenant_id: TenantId,
    from_: From = None,
    to: To = None,
    user_id: Equal = None,
    agent_id: Equal = None,
    deployment_id: Equal = None,
    model: Equal = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description="at most this many events")
    ] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None, Query(description="`next_cursor` of the previous page; absent: the newest")
    ] = None,
) -> UsageEventsAnswer:
    query = event_query(
        now=context.clock(),
        from_text=from_,
        to_text=to,
        filters={
            "user_id": user_id,
            "agent_id": agent_id,
            "deployment_id": deployment_id,
            "model": model,
        },
        limit=limit,
        cursor=cursor,
    )
    async with connection_from(context.pool) as connection:
        page = await usage_event_page(connection, tenant_id, query)
    return UsageEventsAnswer(
        items=page.items,
        next_cursor=encode_cursor(page.last) if page.more and page.last else None,
    )
