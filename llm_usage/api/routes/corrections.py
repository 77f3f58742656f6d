"""`/v1/usage-events/{gateway_request_id}`: a stored event with its corrections (members of its
tenant), and publishing a correction of it (platform admins).

The API only corrects what is stored (404 otherwise): a correction it publishes always names its
event's `occurred_at`, and an amend carries every corrigible field (the ones asked for over the
current effective values). The consumers apply it shortly after the 202.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final

import structlog
from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator

from llm_usage.api.auth import Principal, Role
from llm_usage.api.context import ApiContext, Context
from llm_usage.api.correction_models import (
    CorrectionAnswer,
    CorrectionBody,
    EventHistoryAnswer,
    NotStoredAnswer,
)
from llm_usage.api.guards import AnyRole, PlatformAdmin
from llm_usage.api.http import ERRORS, body_model, read_body
from llm_usage.api.models import ErrorAnswer
from llm_usage.api.params import invalid, parse_instant
from llm_usage.domain.ids import is_clean_id, is_storable_text
from llm_usage.domain.policies import InvalidPolicyError, check_tenant_id
from llm_usage.schemas.correction_request import (
    CorrectionAsked,
    EventKey,
    InvalidCorrectionError,
    correction_event,
)
from llm_usage.storage.event_history import (
    correction_waiting,
    effective_values,
    event_history,
    find_event,
    window_tenant,
)
from llm_usage.storage.pool import Connection, connection_from
from llm_usage.storage.usage_event_pages import StoredUsageEvent

MAX_CORRECTION_BODY_BYTES: Final = 64 * 1024
_MAX_ID_LENGTH: Final = 200

_log = structlog.get_logger("llm_usage.api")

router = APIRouter(prefix="/v1/usage-events", tags=["corrections"], responses=ERRORS)


def _check_request_id(value: str) -> str:
    if not 1 <= len(value) <= _MAX_ID_LENGTH:
        raise ValueError(f"must be 1 to {_MAX_ID_LENGTH} characters")
    if not (is_clean_id(value) and is_storable_text(value)):
        raise ValueError("must have no leading or trailing whitespace and no control characters")
    return value


RequestId = Annotated[
    str,
    Path(description="the event's gateway_request_id"),
    AfterValidator(_check_request_id),
]
_NOT_STORED: Final[dict[int | str, dict[str, Any]]] = {
    404: {"model": NotStoredAnswer, "description": "no stored event has this id (in this tenant)"}
}


def _instant(location: tuple[str, ...], text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_instant(text)
    except (ValueError, OverflowError) as error:
        raise invalid(location, str(error), text) from None


def _checked_tenant(location: tuple[str, ...], text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return check_tenant_id(text)
    except InvalidPolicyError as error:
        raise invalid(location, error.problem, text) from None


@dataclass(frozen=True, slots=True)
class _Wanted:
    """Which event a request names besides its id: its tenant and a hint of its time, as given
    in the query or the body (`where`)."""

    where: str
    tenant_id: str | None
    occurred_at: datetime | None


def _wanted(where: str, tenant_text: str | None, hint_text: str | None) -> _Wanted:
    tenant_id = _checked_tenant((where, "tenant_id"), tenant_text)
    return _Wanted(where, tenant_id, _instant((where, "event_occurred_at"), hint_text))


async def _stored_event(
    connection: Connection, principal: Principal, gateway_request_id: str, wanted: _Wanted
) -> StoredUsageEvent | JSONResponse:
    """The stored event, or the 404 saying whether a correction of it waits."""
    tenant = await _tenant_of(connection, principal, gateway_request_id, wanted)
    event = await find_event(connection, tenant, gateway_request_id, occurred_at=wanted.occurred_at)
    if event is not None:
        return event
    waiting = await correction_waiting(connection, tenant, gateway_request_id)
    answer = NotStoredAnswer(
        detail=f"tenant {tenant!r} has no stored event {gateway_request_id!r}", waiting=waiting
    )
    return JSONResponse(answer.model_dump(), status_code=404)


async def _tenant_of(
    connection: Connection, principal: Principal, gateway_request_id: str, wanted: _Wanted
) -> str:
    """The event's tenant: a tenant role's own (403 if it asks for another); for a platform
    admin the one asked for, else the id window's (422 when the window does not know it)."""
    own = None if principal.role is Role.PLATFORM_ADMIN else principal.tenant_id
    if own is not None:
        if wanted.tenant_id not in (None, own):
            raise HTTPException(403, "this token does not give access to this tenant")
        return own
    if wanted.tenant_id is not None:
        return wanted.tenant_id
    found = await window_tenant(connection, gateway_request_id)
    if found is None:
        raise invalid(
            (wanted.where, "tenant_id"),
            "pass tenant_id: this id is not in the id window, and ids repeat across tenants "
            "past it",
        )
    return found


@router.get(
    "/{gateway_request_id}",
    response_model=EventHistoryAnswer,
    responses=_NOT_STORED,
    summary="A stored event, its effective values and its corrections, oldest first",
    description=(
        "Members see their own tenant's events; a platform admin names the tenant with "
        "`tenant_id` (it may be left out while the id is in the id window). `event` is the "
        "event as stored (never changed); `effective` what it counts for now; `waiting`: a "
        "correction of it is published but not applied yet."
    ),
)
async def show_event(
    principal: AnyRole,
    context: Context,
    gateway_request_id: RequestId,
    tenant_id: Annotated[
        str | None, Query(description="the event's tenant (tenant roles: their own)")
    ] = None,
    event_occurred_at: Annotated[
        str | None,
        Query(description="RFC 3339: the event's occurred_at, to find an old event quickly"),
    ] = None,
) -> EventHistoryAnswer | JSONResponse:
    wanted = _wanted("query", tenant_id, event_occurred_at)
    async with connection_from(context.pool) as connection:
        event = await _stored_event(connection, principal, gateway_request_id, wanted)
        if isinstance(event, JSONResponse):
            return event
        history = await event_history(connection, event)
    return EventHistoryAnswer.model_validate(history)


@router.post(
    "/{gateway_request_id}/corrections",
    response_model=CorrectionAnswer,
    status_code=202,
    responses={
        **_NOT_STORED,
        413: {"model": ErrorAnswer, "description": "the body is too large"},
    },
    summary="Publish a correction (void or amend) of a stored event; applied asynchronously",
    description=(
        "Platform admins only; the actor is the token's `sub`. An amend is published with "
        "every corrigible field: those in `fields` over the event's current effective values. "
        "202: the `llm_usage_corrected` event is on the usage topic (sending the same "
        "`correction_id` again is harmless); GET the event to see it applied."
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": CorrectionBody.model_json_schema()}},
        }
    },
)
async def post_correction(
    principal: PlatformAdmin,
    context: Context,
    request: Request,
    gateway_request_id: RequestId,
) -> CorrectionAnswer | JSONResponse:
    body = body_model(await read_body(request, MAX_CORRECTION_BODY_BYTES), CorrectionBody)
    wanted = _wanted("body", body.tenant_id, body.event_occurred_at)
    now = context.clock()
    occurred_at = _instant(("body", "occurred_at"), body.occurred_at) or now
    async with connection_from(context.pool) as connection:
        event = await _stored_event(connection, principal, gateway_request_id, wanted)
        if isinstance(event, JSONResponse):
            return event
        current = await effective_values(connection, event)
    asked = CorrectionAsked(
        action=body.action,
        changes=body.fields or {},
        reason=body.reason,
        actor=principal.subject,
        occurred_at=occurred_at,
        correction_id=str(uuid.uuid4()) if body.correction_id is None else body.correction_id,
    )
    try:
        published, value = correction_event(asked, event=_key(event), current=current, now=now)
    except InvalidCorrectionError as error:
        location = ("body", *error.field.split(".")) if error.field else ("body",)
        raise invalid(location, error.problem) from None
    await _publish(context, event.tenant_id, asked.correction_id, value)
    return CorrectionAnswer(correction_id=asked.correction_id, event=published)


def _key(event: StoredUsageEvent) -> EventKey:
    return EventKey(event.tenant_id, event.gateway_request_id, event.occurred_at)


async def _publish(context: ApiContext, tenant_id: str, correction_id: str, value: bytes) -> None:
    """On the usage topic (keyed by tenant, acks=all) before the answer, else 503."""
    try:
        producer = await context.usage_producer()
        delivery = await producer.send(
            context.settings.usage_topic, value=value, key=tenant_id.encode()
        )
        await delivery
    except Exception as error:  # noqa: BLE001 - whatever failed, nothing is published: 503
        _log.warning(
            "A correction could not be published; answering 503.",
            topic=context.settings.usage_topic,
            tenant_id=tenant_id,
            correction_id=correction_id,
            error=f"{type(error).__name__}: {error}",
        )
        raise HTTPException(
            503,
            "the correction could not be published to the usage topic: send it again with "
            f"correction_id {correction_id!r} (a repeat of it is harmless)",
        ) from None
