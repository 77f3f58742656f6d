"""`/healthz`, `/readyz` and `/metrics`: for the orchestrator and Prometheus, not documented."""

from __future__ import annotations

from typing import Final

import asyncpg
from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llm_usage.api.context import Context
from llm_usage.storage.pool import CONNECTION_ERRORS

READY_TIMEOUT_SECONDS: Final = 2.0

_NOT_READY: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
async def healthz() -> PlainTextResponse:
    return PlainTextResponse("ok\n")


@router.get("/readyz")
async def readyz(context: Context) -> PlainTextResponse:
    try:
        await context.pool.fetchval("SELECT 1", timeout=READY_TIMEOUT_SECONDS)
    except _NOT_READY as error:
        return PlainTextResponse(
            f"not ready: the database does not answer ({type(error).__name__})\n",
            status_code=503,
        )
    return PlainTextResponse("ready\n")


@router.get("/metrics")
async def metrics(context: Context) -> Response:
    body = generate_latest(context.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
