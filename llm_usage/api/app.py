"""The FastAPI application: routes, their guards, errors and metrics.

Every `/v1` route takes its caller from a guard (`_member`, `_tenant_admin`, `_platform_admin`)
as its first dependency. FastAPI runs dependencies before it validates path and query
parameters, and the routes read their bodies themselves, so a request is judged in the
contract's order: authentication (401), then access (403), then parameters (422).
"""

from __future__ import annotations

import json
import time as monotonic_time
from collections.abc import Awaitable, Callable
from datetime import UTC, timedelta
from typing import Annotated, Any, Final

import asyncpg
import structlog
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_usage.api import ingest, ui
from llm_usage.api.auth import InvalidTokenError, Principal, Role
from llm_usage.api.context import ApiContext
from llm_usage.api.models import (
    AlertsAnswer,
    BudgetsAnswer,
    ErrorAnswer,
    IngestAnswer,
    InvoiceLinesAnswer,
    PoliciesAnswer,
    PolicyBody,
    PolicyChangeAnswer,
    UsageBreakdownAnswer,
    UsageDailyAnswer,
    UsageSummaryAnswer,
)
from llm_usage.api.params import invalid, query_instant, rfc3339, time_range
from llm_usage.rollup.lines import InvoiceLine
from llm_usage.rollup.periods import InvalidPeriodError, parse_period
from llm_usage.schemas.budget import ScopeType, canonical_decimal
from llm_usage.schemas.budget_policy import (
    BudgetPolicy,
    InvalidPolicyError,
    check_tenant_id,
    parse_limit_usd,
    parse_scope_type,
    scope_id_for,
)
from llm_usage.storage import usage_reports
from llm_usage.storage.budget_policies import delete_policy, set_policy, tenant_policies
from llm_usage.storage.budget_status import tenant_budget_status
from llm_usage.storage.invoice_lines import lines_for
from llm_usage.storage.pool import CONNECTION_ERRORS, DatabaseUnavailableError, connection_from
from llm_usage.storage.usage_reports import Dimension

API_VERSION: Final = "1.0.0"
MAX_POLICY_BODY_BYTES: Final = 64 * 1024
MAX_DAYS: Final = 366
MAX_BREAKDOWN_ITEMS: Final = 1000
MAX_ALERTS: Final = 1000
READY_TIMEOUT_SECONDS: Final = 2.0
UI_TOKEN_COOKIE: Final = "llm_usage_token"  # noqa: S105 - a cookie name

_log = structlog.get_logger("llm_usage.api")
_NOT_READY: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
_bearer = HTTPBearer(
    auto_error=False,
    description="A JWT: `aud`, `exp`, `sub`, `role`, and `tenant_id` for the tenant roles.",
)

_UNAUTHENTICATED = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorAnswer, "description": "no token, or an invalid one"},
    403: {"model": ErrorAnswer, "description": "a valid token without access to this"},
    422: {"description": "a malformed parameter; `detail[].loc` names it"},
    503: {"model": ErrorAnswer, "description": "the database (or Kafka) cannot be reached"},
}


def _context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


def _guard(role: Role, *, cookie: bool = False) -> Callable[..., Awaitable[Principal]]:
    """The caller, if a valid token gives `role` on the path's tenant; else 401 or 403. With
    `cookie`, a page for browsers also takes the token from the `UI_TOKEN_COOKIE` cookie (only
    pages that change nothing: a cookie is sent by the browser whoever made the request)."""

    async def authorize(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        presented = credentials.credentials if credentials is not None else None
        if presented is None and cookie:
            presented = request.cookies.get(UI_TOKEN_COOKIE)
        if presented is None:
            raise HTTPException(401, "send `Authorization: Bearer <JWT>`", headers=_UNAUTHENTICATED)
        try:
            principal = _context(request).verifier.verify(presented)
        except InvalidTokenError as error:
            raise HTTPException(401, str(error), headers=_UNAUTHENTICATED) from None
        tenant_id = request.path_params.get("tenant_id")
        if not principal.may(role, tenant_id):
            if principal.role.rank < role.rank:
                raise HTTPException(403, f"this needs the role {role.value} or above")
            raise HTTPException(403, "this token does not give access to this tenant")
        return principal

    authorize.__name__ = f"authorize_{role.name.lower()}"
    return authorize


Member = Annotated[Principal, Depends(_guard(Role.TENANT_MEMBER))]
PageMember = Annotated[Principal, Depends(_guard(Role.TENANT_MEMBER, cookie=True))]
TenantAdmin = Annotated[Principal, Depends(_guard(Role.TENANT_ADMIN))]
PlatformAdmin = Annotated[Principal, Depends(_guard(Role.PLATFORM_ADMIN))]

TenantId = Annotated[
    str,
    Path(description="the tenant: 1-200 characters, no control characters or outer spaces"),
    AfterValidator(check_tenant_id),
]


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


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) one over `limit` bytes without reading all of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _money(value: Any) -> str:
    return canonical_decimal(value)


def _policy_error(error: InvalidPolicyError, where: str) -> RequestValidationError:
    location = (where, error.field) if error.field else (where,)
    return invalid(location, error.problem)


def create_app(context: ApiContext | None) -> FastAPI:
    """The API over `context` (whose pool and producer its owner closes); None builds the routes
    only, for the OpenAPI document."""
    app = FastAPI(
        title="llm-usage-pipeline API",
        version=API_VERSION,
        description=(
            "Usage and budget reads for portals, budget policy changes, invoice lines, and the "
            "gateways' HTTP ingest path. Money is an exact decimal string, counts are integers, "
            "times RFC 3339 in UTC. See the contract's HTTP API section."
        ),
        docs_url=None,
        redoc_url=None,
    )
    app.state.context = context
    if context is not None:
        app.add_middleware(_MetricsMiddleware, context=context)
    _add_error_handlers(app)
    _add_probes(app)
    _add_usage_routes(app)
    _add_budget_routes(app)
    _add_finance_and_ingest_routes(app)
    _add_ui_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def database_unavailable(request: Request, error: Exception) -> Response:
        _log.warning("api_database_unavailable", path=request.url.path, error=str(error))
        return JSONResponse(
            {"detail": "the database cannot be reached; try again shortly"}, status_code=503
        )

    async def not_migrated(request: Request, error: Exception) -> Response:
        _log.error("api_database_not_migrated", path=request.url.path, error=str(error))
        return JSONResponse(
            {"detail": "the database is not migrated; run `llm-usage migrate`"}, status_code=503
        )

    unavailable: tuple[type[BaseException], ...] = (DatabaseUnavailableError, *CONNECTION_ERRORS)
    for kind in unavailable:
        if issubclass(kind, Exception):
            app.add_exception_handler(kind, database_unavailable)
    for kind in (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
        app.add_exception_handler(kind, not_migrated)


def _add_probes(app: FastAPI) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> PlainTextResponse:
        try:
            await _context(request).pool.fetchval("SELECT 1", timeout=READY_TIMEOUT_SECONDS)
        except _NOT_READY as error:
            return PlainTextResponse(
                f"not ready: the database does not answer ({type(error).__name__})\n",
                status_code=503,
            )
        return PlainTextResponse("ready\n")

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        body = generate_latest(_context(request).metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


def _add_usage_routes(app: FastAPI) -> None:
    @app.get(
        "/v1/tenants/{tenant_id}/usage/summary",
        response_model=UsageSummaryAnswer,
        responses=_ERRORS,
        tags=["usage"],
        summary="Totals over [from, to)",
    )
    async def usage_summary(
        principal: Member,
        request: Request,
        tenant_id: TenantId,
        from_: Annotated[
            str | None,
            Query(alias="from", description="RFC 3339 or a date; default: this UTC month's start"),
        ] = None,
        to: Annotated[str | None, Query(description="RFC 3339 or a date; default: now")] = None,
    ) -> dict[str, Any]:
        context = _context(request)
        start, end = time_range(from_, to, now=context.clock())
        async with connection_from(context.pool) as connection:
            summary = await usage_reports.usage_summary(connection, tenant_id, start=start, end=end)
        return {
            "tenant_id": tenant_id,
            "from": rfc3339(start),
            "to": rfc3339(end),
            "requests": summary.requests,
            "input_tokens": summary.input_tokens,
            "output_tokens": summary.output_tokens,
            "cached_input_tokens": summary.cached_input_tokens,
            "reasoning_tokens": summary.reasoning_tokens,
            "total_tokens": summary.total_tokens,
            "customer_charge_usd": _money(summary.customer_charge_usd),
        }

    @app.get(
        "/v1/tenants/{tenant_id}/usage/breakdown",
        response_model=UsageBreakdownAnswer,
        responses=_ERRORS,
        tags=["usage"],
        summary="Usage per deployment, model, provider, user, agent, channel or feature",
    )
    async def usage_breakdown(  # noqa: PLR0917 - FastAPI passes parameters by name
        principal: Member,
        request: Request,
        tenant_id: TenantId,
        by: Annotated[Dimension, Query(description="the attribute to group by")],
        from_: Annotated[
            str | None,
            Query(alias="from", description="RFC 3339 or a date; default: this UTC month's start"),
        ] = None,
        to: Annotated[str | None, Query(description="RFC 3339 or a date; default: now")] = None,
        limit: Annotated[
            int, Query(ge=1, le=MAX_BREAKDOWN_ITEMS, description="at most this many items")
        ] = 100,
    ) -> dict[str, Any]:
        context = _context(request)
        start, end = time_range(from_, to, now=context.clock())
        async with connection_from(context.pool) as connection:
            items = await usage_reports.usage_breakdown(
                connection, tenant_id, by=by, start=start, end=end, limit=limit
            )
        return {
            "by": by.value,
            "from": rfc3339(start),
            "to": rfc3339(end),
            "items": [
                {
                    "key": item.key,
                    "requests": item.requests,
                    "input_tokens": item.input_tokens,
                    "output_tokens": item.output_tokens,
                    "customer_charge_usd": _money(item.customer_charge_usd),
                }
                for item in items
            ],
        }

    @app.get(
        "/v1/tenants/{tenant_id}/usage/daily",
        response_model=UsageDailyAnswer,
        responses=_ERRORS,
        tags=["usage"],
        summary="Requests and charge per UTC day, the last `days` days up to today",
    )
    async def usage_daily(
        principal: Member,
        request: Request,
        tenant_id: TenantId,
        days: Annotated[int, Query(ge=1, le=MAX_DAYS, description="days, today included")] = 30,
    ) -> dict[str, Any]:
        context = _context(request)
        today = context.clock().astimezone(UTC).date()
        async with connection_from(context.pool) as connection:
            items = await usage_reports.usage_daily(
                connection, tenant_id, first_day=today - timedelta(days=days - 1), last_day=today
            )
        return {
            "items": [
                {
                    "date": item.day.isoformat(),
                    "requests": item.requests,
                    "customer_charge_usd": _money(item.customer_charge_usd),
                }
                for item in items
            ]
        }


def _add_budget_routes(app: FastAPI) -> None:
    @app.get(
        "/v1/tenants/{tenant_id}/budgets",
        response_model=BudgetsAnswer,
        responses=_ERRORS,
        tags=["budgets"],
        summary="Each policy window in its current period: spend, limit, percent, level",
    )
    async def budgets(principal: Member, request: Request, tenant_id: TenantId) -> dict[str, Any]:
        context = _context(request)
        async with connection_from(context.pool) as connection:
            statuses = await tenant_budget_status(connection, tenant_id, now=context.clock())
        return {"items": [status.to_json() for status in statuses]}

    @app.get(
        "/v1/tenants/{tenant_id}/alerts",
        response_model=AlertsAnswer,
        responses=_ERRORS,
        tags=["budgets"],
        summary="Budget alerts emitted, newest first",
    )
    async def alerts(
        principal: Member,
        request: Request,
        tenant_id: TenantId,
        since: Annotated[
            str | None, Query(description="RFC 3339 or a date: only alerts decided since then")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_ALERTS, description="at most this many")] = 100,
    ) -> dict[str, Any]:
        context = _context(request)
        since_at = None if since is None else query_instant("since", since, context.clock())
        async with connection_from(context.pool) as connection:
            items = await usage_reports.emitted_alerts(
                connection, tenant_id, since=since_at, limit=limit
            )
        return {"items": items}

    @app.get(
        "/v1/tenants/{tenant_id}/budget-policies",
        response_model=PoliciesAnswer,
        responses=_ERRORS,
        tags=["budgets"],
        summary="The tenant's budget policies",
    )
    async def list_policies(
        principal: Member, request: Request, tenant_id: TenantId
    ) -> dict[str, Any]:
        async with connection_from(_context(request).pool) as connection:
            policies = await tenant_policies(connection, tenant_id)
        return {"items": [policy.to_json() for policy in policies]}

    @app.put(
        "/v1/tenants/{tenant_id}/budget-policies",
        response_model=PolicyChangeAnswer,
        responses=_ERRORS,
        tags=["budgets"],
        summary="Create or replace a scope's whole policy (a limit left out is removed); audited",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PolicyBody.model_json_schema()}},
            }
        },
    )
    async def put_policy(
        principal: TenantAdmin, request: Request, tenant_id: TenantId
    ) -> dict[str, Any]:
        policy = _policy_from_body(tenant_id, await _read_body(request, MAX_POLICY_BODY_BYTES))
        async with connection_from(_context(request).pool) as connection:
            change = await set_policy(connection, policy, actor=principal.subject)
        if not change.changed:
            result = "unchanged"
        else:
            result = "created" if change.old is None else "replaced"
        return {
            "result": result,
            "policy": policy.to_json(),
            "previous": None if change.old is None else change.old.to_json(),
        }

    @app.delete(
        "/v1/tenants/{tenant_id}/budget-policies",
        response_model=PolicyChangeAnswer,
        responses={**_ERRORS, 404: {"model": ErrorAnswer, "description": "no such policy"}},
        tags=["budgets"],
        summary="Delete a scope's policy; audited",
    )
    async def delete_scope_policy(
        principal: TenantAdmin,
        request: Request,
        tenant_id: TenantId,
        scope_type: Annotated[str, Query(description="tenant, deployment, user or agent")],
        scope_id: Annotated[
            str | None, Query(description="required unless scope_type is tenant")
        ] = None,
    ) -> dict[str, Any]:
        try:
            scope = parse_scope_type(scope_type)
        except InvalidPolicyError as error:
            raise _policy_error(error, "query") from None
        try:
            resolved_id = scope_id_for(tenant_id, scope, scope_id)
        except InvalidPolicyError as error:
            raise _policy_error(error, "query") from None
        async with connection_from(_context(request).pool) as connection:
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
        return {"result": "deleted", "policy": None, "previous": change.old.to_json()}


def _policy_from_body(tenant_id: str, body: bytes) -> BudgetPolicy:
    """The policy a PUT body describes, checked as `llm-usage policy set` checks its arguments."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise invalid(("body",), f"not a JSON object: {error}") from None
    if not isinstance(data, dict):
        raise invalid(("body",), "must be a JSON object", data)
    try:
        parsed = PolicyBody.model_validate(data, strict=True)
    except ValidationError as error:
        raise RequestValidationError(
            [
                {**each, "loc": ("body", *each["loc"])}
                for each in error.errors(include_url=False, include_context=False)
            ]
        ) from None
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
        )
    except InvalidPolicyError as error:
        raise _policy_error(error, "body") from None


def _add_finance_and_ingest_routes(app: FastAPI) -> None:
    @app.get(
        "/v1/tenants/{tenant_id}/invoice-lines",
        response_model=InvoiceLinesAnswer,
        responses=_ERRORS,
        tags=["finance"],
        summary="The month's stored invoice lines, as `llm-usage rollup run --json` prints them",
    )
    async def invoice_lines(
        principal: TenantAdmin,
        request: Request,
        tenant_id: TenantId,
        period: Annotated[str, Query(description="the month billed in, YYYY-MM (UTC)")],
    ) -> dict[str, Any]:
        try:
            parse_period(period)
        except InvalidPeriodError as error:
            raise invalid(("query", "period"), str(error), period) from None
        async with connection_from(_context(request).pool) as connection:
            stored = await lines_for(connection, period=period, tenant_id=tenant_id)
            closed = await usage_reports.closed_period(connection, period)
        items = [
            InvoiceLine(
                tenant_id=line.tenant_id,
                period=line.period,
                deployment_id=line.deployment_id,
                kind=line.kind,
                qty=line.qty,
                amount_cents=line.amount_cents,
                description=line.description,
                meta=line.meta,
                closed=closed,
                resource_kind=line.resource_kind,
                unit=line.unit,
                unit_price_cents=line.unit_price_cents,
            ).as_json()
            for line in stored
        ]
        return {"period": period, "closed": closed, "items": items}

    @app.post(
        "/v1/usage-events",
        response_model=IngestAnswer,
        responses={
            **_ERRORS,
            413: {"model": ErrorAnswer, "description": "the body is too large"},
        },
        tags=["ingest"],
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
    async def post_usage_events(principal: PlatformAdmin, request: Request) -> dict[str, Any]:
        context = _context(request)
        body = await _read_body(request, ingest.MAX_BODY_BYTES)
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
                _log.warning("api_ingest_publish_failed", error=f"{type(error).__name__}: {error}")
                raise HTTPException(
                    503,
                    "the events could not all be published to the usage topic, so none is "
                    "reported accepted: send them all again (their ids make a repeat harmless)",
                ) from None
        accepted = sum(event.accepted for event in checked)
        context.metrics.ingested.labels("accepted").inc(accepted)
        context.metrics.ingested.labels("rejected").inc(len(checked) - accepted)
        return {"results": [event.as_json() for event in checked]}


def _add_ui_routes(app: FastAPI) -> None:
    @app.get(
        "/ui/tenants/{tenant_id}",
        response_class=HTMLResponse,
        responses=_ERRORS,
        tags=["ui"],
        summary="A page for people: budgets, the last 30 days, top models and users",
        description=(
            "HTML. The token comes as `Authorization: Bearer` or, from a browser, in the "
            f"`{UI_TOKEN_COOKIE}` cookie."
        ),
    )
    async def tenant_page(
        principal: PageMember, request: Request, tenant_id: TenantId
    ) -> HTMLResponse:
        context = _context(request)
        now = context.clock()
        start, end = ui.month_range(now)
        first_day, last_day = ui.daily_range(now)
        async with connection_from(context.pool) as connection:
            month = await usage_reports.usage_summary(connection, tenant_id, start=start, end=end)
            budgets = await tenant_budget_status(connection, tenant_id, now=now)
            daily = await usage_reports.usage_daily(
                connection, tenant_id, first_day=first_day.date(), last_day=last_day.date()
            )
            top = {
                by: await usage_reports.usage_breakdown(
                    connection, tenant_id, by=by, start=start, end=end, limit=ui.TOP
                )
                for by in (Dimension.MODEL, Dimension.USER)
            }
        page = ui.render_page(
            tenant_id=tenant_id,
            now=now,
            month=month,
            budgets=budgets,
            daily=daily,
            models=top[Dimension.MODEL],
            users=top[Dimension.USER],
        )
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})
