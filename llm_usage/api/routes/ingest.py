"""`POST /v1/usage-events`: the gateways' HTTP path onto the usage topic."""

from __future__ import annotations

import structlog
from fastapi import APIRouter, HTTPException, Request

from llm_usage.api import ingest
from llm_usage.api.context import Context
from llm_usage.api.guards import GatewayCaller
from llm_usage.api.http import ERRORS, read_body
from llm_usage.api.models import ErrorAnswer, IngestAnswer
from llm_usage.api.params import invalid

_log = structlog.get_logger("llm_usage.api")

router = APIRouter(tags=["ingest"], responses=ERRORS)


@router.post(
    "/v1/usage-events",
    responses={413: {"model": ErrorAnswer, "description": "the body is too large"}},
    summary="Publish usage events (one, or an array of at most 1,000) to the usage topic",
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "a usage event v1, or an array of at most 1,000",
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {"type": "object"},
                            {
                                "type": "array",
                                "items": {"type": "object"},
                                "maxItems": ingest.MAX_EVENTS,
                            },
                        ]
                    }
                }
            },
        }
    },
)
async def post_usage_events(
    principal: GatewayCaller, context: Context, request: Request
) -> IngestAnswer:
    body = await read_body(request, ingest.MAX_BODY_BYTES)
    try:
        events = ingest.split_events(body)
    except ingest.MalformedBodyError as error:
        raise invalid(("body",), str(error)) from None
    checked = ingest.check_events(events, now=context.clock())
    if any(event.accepted for event in checked):
        try:
            producer = await context.usage_producer()
            await ingest.publish(producer, context.settings.usage_topic, checked)
        except Exception as error:  # noqa: BLE001 - whatever failed, nothing is settled: 503
            _log.warning(
                "Posted events could not all be published; none is reported accepted.",
                topic=context.settings.usage_topic,
                events=len(checked),
                error=f"{type(error).__name__}: {error}",
            )
            raise HTTPException(
                503,
                "the events could not all be published to the usage topic, so none is "
                "reported accepted: send them all again (their ids make a repeat harmless)",
            ) from None
    accepted = sum(event.accepted for event in checked)
    context.metrics.ingested.labels("accepted").inc(accepted)
    context.metrics.ingested.labels("rejected").inc(len(checked) - accepted)
    return IngestAnswer(results=checked)
