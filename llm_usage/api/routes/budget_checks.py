"""`POST /v1/budget-checks`: a gateway asks, before an LLM request, whether the tenant's blocking
limits leave room for it; an allow holds the estimate until the request's event is counted.

The estimate and the "already counted?" lookup happen first, outside any lock; the decision is
one call of the database function `budget_check` in autocommit (storage/budget_holds.py), so
the counters' locks are never held across an await of this process."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Final

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from llm_usage.api.check_models import BudgetCheckAnswer
from llm_usage.api.context import ApiMetrics, Context
from llm_usage.api.guards import GatewayCaller
from llm_usage.api.http import ERRORS, read_body
from llm_usage.api.models import ErrorAnswer
from llm_usage.api.params import invalid
from llm_usage.core.faults import crash_here
from llm_usage.domain.holds import ALLOW, CheckOutcome
from llm_usage.domain.prices import cost_usd, in_effect
from llm_usage.schemas.budget_check import (
    MAX_CHECK_BYTES,
    BudgetCheckRequest,
    MalformedCheckError,
    parse_budget_check,
)
from llm_usage.storage.budget_holds import (
    BudgetCheckBusy,
    first_answer,
    place_check,
    request_counted,
)
from llm_usage.storage.pool import Connection, connection_from
from llm_usage.storage.prices import load_prices

# Tests crash the API here: after the decision is committed, before the answer is sent.
FAULT_CHECK_ANSWERED: Final = "budget_check_answered"

router = APIRouter(tags=["budget checks"], responses=ERRORS)


@router.post(
    "/v1/budget-checks",
    responses={
        413: {"model": ErrorAnswer, "description": "the body is too large"},
        503: {
            "model": ErrorAnswer,
            "description": "the database cannot be reached, or the tenant's counters stayed "
            "locked too long: try again with the same gateway_request_id",
        },
    },
    summary="Before an LLM request: allow (and hold the estimate) or deny, by blocking limits",
    description="A deny answers 200 too. A repeated gateway_request_id answers the first "
    "answer and holds nothing more; a request whose event is already counted is allowed with "
    "no hold. The hold ends when the budget consumer counts the request's usage event (same "
    "gateway_request_id), or after BUDGET_HOLD_SECONDS. Gateways and platform admins only.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": BudgetCheckRequest.model_json_schema()}},
        }
    },
)
async def post_budget_check(
    principal: GatewayCaller, context: Context, request: Request
) -> BudgetCheckAnswer:
    check = _check_from(await read_body(request, MAX_CHECK_BYTES))
    now = context.clock()
    async with connection_from(context.pool) as connection:
        estimate = check.estimated_charge_usd
        if estimate is None:
            estimate = await _priced(connection, check, now=now)
        if await request_counted(connection, check.tenant_id, check.gateway_request_id):
            outcome = await first_answer(
                connection, check.tenant_id, check.gateway_request_id
            ) or CheckOutcome(ALLOW, (), None, estimate, "counted")
        else:
            try:
                outcome = await place_check(
                    connection,
                    tenant_id=check.tenant_id,
                    gateway_request_id=check.gateway_request_id,
                    deployment_id=check.deployment_id,
                    user_id=check.user_id,
                    agent_id=check.agent_id,
                    amount_usd=estimate,
                    now=now,
                    hold_seconds=context.settings.budget_hold_seconds,
                )
            except BudgetCheckBusy as error:
                raise HTTPException(503, str(error)) from None
    crash_here(FAULT_CHECK_ANSWERED)
    _count(context.metrics, outcome)
    return BudgetCheckAnswer.model_validate(outcome)


def _check_from(body: bytes) -> BudgetCheckRequest:
    try:
        return parse_budget_check(body)
    except MalformedCheckError as error:
        raise invalid(("body",), str(error)) from None
    except ValidationError as error:
        raise RequestValidationError(
            [
                {**each, "loc": ("body", *each["loc"])}
                for each in error.errors(include_url=False, include_context=False)
            ]
        ) from None


async def _priced(connection: Connection, check: BudgetCheckRequest, *, now: datetime) -> Decimal:
    """The tokens form's estimate: its tokens at the price in effect now; a 422 without one."""
    # The tokens form always has both (BudgetCheckRequest refuses it otherwise).
    assert check.provider is not None
    assert check.model is not None
    pair = (check.provider, check.model)
    price = in_effect((await load_prices(connection, [pair])).get(pair, []), now)
    if price is None:
        message = "no price in effect for this provider and model; send estimated_charge_usd"
        raise RequestValidationError(
            [
                {"type": "value_error", "loc": ("body", name), "msg": message, "input": value}
                for name, value in (("provider", check.provider), ("model", check.model))
            ]
        )
    return cost_usd(
        price,
        input_tokens=check.input_tokens,
        output_tokens=check.output_tokens,
        cached_input_tokens=check.cached_input_tokens,
        reasoning_tokens=check.reasoning_tokens,
    )


def _count(metrics: ApiMetrics, outcome: CheckOutcome) -> None:
    metrics.budget_checks.labels(outcome.decision, outcome.answer).inc()
    if outcome.answer == "new":  # a repeat reports a denial already counted
        for limit in outcome.denied_by:
            metrics.budget_check_denials.labels(limit.scope_type, limit.window).inc()
