"""`/v1/prices`: the price table, read by any caller and added to by platform admins (each row
audited with the token's `sub`); rows never change (llm_usage/domain/prices.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from llm_usage.api.context import Context
from llm_usage.api.guards import AnyRole, PlatformAdmin
from llm_usage.api.http import ERRORS, read_body
from llm_usage.api.models import ErrorAnswer
from llm_usage.api.params import invalid, query_instant
from llm_usage.api.price_models import PriceAnswer, PriceBody, PricesAddedAnswer, PricesAnswer
from llm_usage.domain.prices import Price, in_effect, new_price
from llm_usage.storage.pool import connection_from
from llm_usage.storage.prices import PriceRefusedError, add_prices, find_prices

MAX_PRICE_BODY_BYTES: Final = 4 * 1024 * 1024  # LiteLLM's whole list is about 2,000 rows
MAX_PRICE_ROWS: Final = 10_000

router = APIRouter(prefix="/v1/prices", tags=["prices"], responses=ERRORS)

_ROWS = TypeAdapter(list[PriceBody])


@router.get("", summary="The price table, or the rows in effect at a time")
async def list_prices(
    principal: AnyRole,
    context: Context,
    provider: Annotated[str | None, Query(description="only this provider's rows")] = None,
    model: Annotated[str | None, Query(description="only this model's rows")] = None,
    at: Annotated[
        str | None, Query(description="RFC 3339 or a date: only each pair's row in effect then")
    ] = None,
) -> PricesAnswer:
    moment = None if at is None else query_instant("at", at, context.clock())
    async with connection_from(context.pool) as connection:
        table = await find_prices(connection, provider=provider, model=model)
    if moment is None:
        rows = [price for pair_rows in table.values() for price in pair_rows]
    else:
        rows = [price for pair_rows in table.values() if (price := in_effect(pair_rows, moment))]
    return PricesAnswer(items=[PriceAnswer.model_validate(price) for price in rows])


@router.put(
    "",
    responses={
        409: {"model": ErrorAnswer, "description": "a row may not be added; nothing was added"},
        413: {"model": ErrorAnswer, "description": "the body is too large"},
    },
    summary="Add rows (one, or an array); all or nothing, audited with the token's `sub`",
    description="A row exactly equal to one in the table is left as it is (`unchanged`). "
    "A pair's first row may start at any time; a later one at least 10 minutes from now "
    "and after the pair's latest row. Platform admins only.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            PriceBody.model_json_schema(),
                            {
                                "type": "array",
                                "items": PriceBody.model_json_schema(),
                                "maxItems": MAX_PRICE_ROWS,
                            },
                        ]
                    }
                }
            },
        }
    },
)
async def put_prices(
    principal: PlatformAdmin, context: Context, request: Request
) -> PricesAddedAnswer:
    rows = prices_from_body(await read_body(request, MAX_PRICE_BODY_BYTES))
    earliest = all(row.effective_from is None for row in rows)
    if not earliest and any(row.effective_from is None for row in rows):
        raise invalid(("body",), "give effective_from in every row or in none")
    prices = [_price(row) for row in rows]
    try:
        async with connection_from(context.pool) as connection:
            addition = await add_prices(
                connection, prices, actor=principal.subject, earliest=earliest
            )
    except PriceRefusedError as error:
        raise HTTPException(409, str(error)) from None
    return PricesAddedAnswer(
        added=[PriceAnswer.model_validate(price) for price in addition.added],
        unchanged=[PriceAnswer.model_validate(price) for price in addition.unchanged],
    )


def prices_from_body(body: bytes) -> list[PriceBody]:
    """The rows a PUT body holds (one object, or an array of them); anything wrong is a 422
    naming the row and field."""
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise invalid(("body",), f"not JSON: {error}") from None
    single = isinstance(data, dict)
    if single:
        data = [data]
    if not isinstance(data, list) or not data:
        raise invalid(("body",), "must be a price row or a non-empty array of them")
    if len(data) > MAX_PRICE_ROWS:
        raise invalid(("body",), f"at most {MAX_PRICE_ROWS} rows")
    try:
        return _ROWS.validate_python(data)
    except ValidationError as error:
        raise RequestValidationError(
            [
                {**each, "loc": ("body", *(each["loc"][1:] if single else each["loc"]))}
                for each in error.errors(include_url=False, include_context=False)
            ]
        ) from None


def _price(row: PriceBody) -> Price:
    # Without a time, the database's clock decides (`earliest`); this one is never stored.
    return new_price(
        row.provider,
        row.model,
        row.effective_from or datetime.now(UTC),
        input=row.input,
        output=row.output,
        cached_input=row.cached_input,
        reasoning=row.reasoning,
        request_fee_usd=row.request_fee_usd,
    )
