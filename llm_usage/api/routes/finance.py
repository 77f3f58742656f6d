"""`/v1/tenants/{tenant_id}/invoice-lines`: a month's stored invoice lines, for finance."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from llm_usage.api.context import Context
from llm_usage.api.guards import TenantAdmin, TenantId
from llm_usage.api.http import ERRORS
from llm_usage.api.models import InvoiceLinesAnswer
from llm_usage.api.params import invalid
from llm_usage.domain.periods import InvalidPeriodError, parse_period
from llm_usage.storage.invoice_lines import closed_period, lines_for
from llm_usage.storage.pool import connection_from

router = APIRouter(prefix="/v1/tenants/{tenant_id}", tags=["finance"], responses=ERRORS)


@router.get(
    "/invoice-lines",
    summary="The month's stored invoice lines, as `llm-usage rollup run --json` prints them",
)
async def invoice_lines(
    principal: TenantAdmin,
    context: Context,
    tenant_id: TenantId,
    period: Annotated[str, Query(description="the month billed in, YYYY-MM (UTC)")],
) -> InvoiceLinesAnswer:
    try:
        parse_period(period)
    except InvalidPeriodError as error:
        raise invalid(("query", "period"), str(error), period) from None
    async with connection_from(context.pool) as connection:
        lines = await lines_for(connection, period=period, tenant_id=tenant_id)
        closed = await closed_period(connection, period)
    return InvoiceLinesAnswer(period=period, closed=closed, items=lines)
