"""`/v1/tenants/{tenant_id}/budgets`, `…/alerts` and `…/budget-policies`: where a tenant stands
against its budgets, the alerts it was sent, and its policies (changed by tenant admins)."""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError

from llm_usage.api.context import Context
from llm_usage.api.event_models import PolicyHistoryAnswer
from llm_usage.api.guards import Member, TenantAdmin, TenantId
from llm_usage.api.http import ERRORS, body_model, read_body
from llm_usage.api.models import (
    AlertsAnswer,
    BudgetsAnswer,
    ErrorAnswer,
    PoliciesAnswer,
    PolicyBody,
    PolicyChangeAnswer,
)
from llm_usage.api.params import invalid, query_instant
from llm_usage.domain.budgets import Enforcement, ScopeType
from llm_usage.domain.policies import (
    BudgetPolicy,
    InvalidPolicyError,
    parse_limit_usd,
    parse_scope_type,
    scope_id_for,
)
from llm_usage.storage import usage_reports
from llm_usage.storage.budget_policies import (
    delete_policy,
    policy_history,
    set_policy,
    tenant_policies,
)
from llm_usage.storage.budget_status import tenant_budget_status
from llm_usage.storage.pool import connection_from

MAX_POLICY_BODY_BYTES: Final = 64 * 1024
MAX_ALERTS: Final = 1000

router = APIRouter(prefix="/v1/tenants/{tenant_id}", tags=["budgets"], responses=ERRORS)


@router.get(
    "/budgets",
    summary="Each policy window in its current period: spend, held, limit, percent, level",
)
async def budgets(principal: Member, context: Context, tenant_id: TenantId) -> BudgetsAnswer:
    async with connection_from(context.pool) as connection:
        statuses = await tenant_budget_status(connection, tenant_id, now=context.clock())
    return BudgetsAnswer(items=statuses)


@router.get("/alerts", summary="Budget alerts emitted, newest first")
async def alerts(
    principal: Member,
    context: Context,
    tenant_id: TenantId,
    since: Annotated[
        str | None, Query(description="RFC 3339 or a date: only alerts decided since then")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_ALERTS, description="at most this many")] = 100,
) -> AlertsAnswer:
    since_at = None if since is None else query_instant("since", since, context.clock())
    async with connection_from(context.pool) as connection:
        items = await usage_reports.emitted_alerts(
            connection, tenant_id, since=since_at, limit=limit
        )
    return AlertsAnswer(items=items)


@router.get("/budget-policies", summary="The tenant's budget policies")
async def list_policies(principal: Member, context: Context, tenant_id: TenantId) -> PoliciesAnswer:
    async with connection_from(context.pool) as connection:
        policies = await tenant_policies(connection, tenant_id)
    return PoliciesAnswer(items=policies)


@router.get(
    "/budget-policies/history",
    summary="The audit of the tenant's policy changes, newest first: when, who, old and new",
    description="What `llm-usage policy history --json` prints, newest first.",
)
async def policies_history(
    principal: TenantAdmin, context: Context, tenant_id: TenantId
) -> PolicyHistoryAnswer:
    async with connection_from(context.pool) as connection:
        entries = await policy_history(connection, tenant_id)
    return PolicyHistoryAnswer(items=entries[::-1])


@router.put(
    "/budget-policies",
    summary="Create or replace a scope's whole policy (a limit left out is removed); audited",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PolicyBody.model_json_schema()}},
        }
    },
)
async def put_policy(
    principal: TenantAdmin, context: Context, request: Request, tenant_id: TenantId
) -> PolicyChangeAnswer:
    policy = policy_from_body(tenant_id, await read_body(request, MAX_POLICY_BODY_BYTES))
    async with connection_from(context.pool) as connection:
        change = await set_policy(connection, policy, actor=principal.subject)
    if not change.changed:
        result = "unchanged"
    elif change.old is None:
        result = "created"
    else:
        result = "replaced"
    return PolicyChangeAnswer(result=result, policy=policy, previous=change.old)


@router.delete(
    "/budget-policies",
    responses={404: {"model": ErrorAnswer, "description": "no such policy"}},
    summary="Delete a scope's policy; audited",
)
async def delete_scope_policy(
    principal: TenantAdmin,
    context: Context,
    tenant_id: TenantId,
    scope_type: Annotated[str, Query(description="tenant, deployment, user or agent")],
    scope_id: Annotated[
        str | None, Query(description="required unless scope_type is tenant")
    ] = None,
) -> PolicyChangeAnswer:
    try:
        scope = parse_scope_type(scope_type)
        resolved_id = scope_id_for(tenant_id, scope, scope_id)
    except InvalidPolicyError as error:
        raise _policy_error(error, "query") from None
    async with connection_from(context.pool) as connection:
        change = await delete_policy(
            connection,
            tenant_id=tenant_id,
            scope_type=scope,
            scope_id=resolved_id,
            actor=principal.subject,
        )
    if change.old is None:
        raise HTTPException(
            404, f"tenant {tenant_id!r} has no {scope.value} policy for {resolved_id!r}"
        )
    return PolicyChangeAnswer(result="deleted", policy=None, previous=change.old)


def policy_from_body(tenant_id: str, body: bytes) -> BudgetPolicy:
    """The policy a PUT body describes, checked as `llm-usage policy set` checks its arguments;
    anything wrong is a 422 naming the field."""
    parsed = body_model(body, PolicyBody)
    try:
        scope = ScopeType(parsed.scope_type)
        return BudgetPolicy(
            tenant_id=tenant_id,
            scope_type=scope,
            scope_id=scope_id_for(tenant_id, scope, parsed.scope_id),
            daily_limit_usd=(
                None
                if parsed.daily_limit_usd is None
                else parse_limit_usd("daily_limit_usd", parsed.daily_limit_usd)
            ),
            monthly_limit_usd=(
                None
                if parsed.monthly_limit_usd is None
                else parse_limit_usd("monthly_limit_usd", parsed.monthly_limit_usd)
            ),
            warn_threshold_pct=parsed.warn_threshold_pct,
            enforcement=Enforcement(parsed.enforcement),
        )
    except InvalidPolicyError as error:
        raise _policy_error(error, "body") from None


def _policy_error(error: InvalidPolicyError, where: str) -> RequestValidationError:
    location = (where, error.field) if error.field else (where,)
    return invalid(location, error.problem)
