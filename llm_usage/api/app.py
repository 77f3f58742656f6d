"""The FastAPI application: `create_app` assembles the routers, error handlers and metrics.

The routes live in `api/routes/`, one router per group; who may call them is `api/guards.py`.
"""

from __future__ import annotations

import time as monotonic_time
from typing import Final

import asyncpg
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_usage.api.context import ApiContext
from llm_usage.api.routes import (
    budget_checks,
    budgets,
    corrections,
    event_pages,
    finance,
    ingest,
    pages,
    prices,
    probes,
    usage,
    usage_events,
)
from llm_usage.storage.pool import CONNECTION_ERRORS, DatabaseUnavailableError

API_VERSION: Final = "1.0.0"

_log = structlog.get_logger("llm_usage.api")


def create_app(context: ApiContext | None) -> FastAPI:
    """The API over `context` (whose pool and producer its owner closes); None builds the routes
    only, for the OpenAPI document."""
    app = FastAPI(
        title="llm-usage-pipeline API",
        version=API_VERSION,
        description=(
            "Usage and budget reads for portals, budget policy changes, the price table, invoice "
            "lines, corrections of stored events, and the gateways' HTTP ingest path and budget "
            "checks. Money is an exact "
            "decimal string, counts are integers, times RFC 3339 in UTC. See the contract's HTTP "
            "API section."
        ),
        docs_url=None,
        redoc_url=None,
    )
    app.state.context = context
    if context is not None:
        app.add_middleware(_MetricsMiddleware, context=context)
    _add_error_handlers(app)
    groups = (
        probes, usage, usage_events, budgets, prices, finance, ingest, corrections,
        budget_checks, pages, event_pages,
    )  # fmt: skip
    for group in groups:
        app.include_router(group.router)
    return app


class _MetricsMiddleware:
    """Counts and times every HTTP answer by method, route template and status."""

    def __init__(self, app: ASGIApp, context: ApiContext) -> None:
        self.app = app
        self.metrics = context.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = monotonic_time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.duration.labels(method, route).observe(
                monotonic_time.perf_counter() - started
            )


async def _database_unavailable(request: Request, error: Exception) -> Response:
    _log.warning(
        "The database cannot be reached; answering 503.",
        path=request.url.path,
        error=str(error),
    )
    return JSONResponse(
        {"detail": "the database cannot be reached; try again shortly"}, status_code=503
    )


async def _not_migrated(request: Request, error: Exception) -> Response:
    _log.error(
        "The database is not migrated; answering 503 until `llm-usage migrate` runs.",
        path=request.url.path,
        error=str(error),
    )
    return JSONResponse(
        {"detail": "the database is not migrated; run `llm-usage migrate`"}, status_code=503
    )


def _add_error_handlers(app: FastAPI) -> None:
    unavailable: tuple[type[BaseException], ...] = (DatabaseUnavailableError, *CONNECTION_ERRORS)
    for kind in unavailable:
        if issubclass(kind, Exception):
            app.add_exception_handler(kind, _database_unavailable)
    for kind in (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
        app.add_exception_handler(kind, _not_migrated)
