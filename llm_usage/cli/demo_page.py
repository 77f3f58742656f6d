"""What the demo shows after its stream: the month's invoice lines (the rollup) and the tenant's
page (the API), with a development token; `--open` serves it."""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Mapping
from decimal import Decimal

import jwt
from pydantic import SecretStr

from llm_usage.api.auth import SECRET_ALGORITHM, Role
from llm_usage.api.guards import UI_TOKEN_PARAMETER
from llm_usage.core.settings import Settings
from llm_usage.domain.invoices import InvoiceLine
from llm_usage.domain.periods import current_period
from llm_usage.local.demo import DemoRun, dollars, heading
from llm_usage.local.dev_token import dev_api_secret, dev_secret_path
from llm_usage.rollup.run import run_rollup
from llm_usage.storage.pool import create_pool

DEMO_API_HOST = "127.0.0.1"
DEFAULT_DEMO_PORT = 8080
DEV_TOKEN_HOURS = 24


def show_invoice_lines(run: DemoRun) -> None:
    """Run the month's rollup for the run's tenants and print its lines."""
    period = current_period(run.now)
    heading(f"Invoice lines for {period} (`llm-usage rollup run --period {period}`: a preview)")
    lines = asyncio.run(invoice_lines(run.settings, period=period, tenants=run.tenants))
    print_invoice_lines(lines, run.exact_by_line())
    print(
        f"  {len(run.alerts)} alerts, {len(lines)} invoice lines; each amount is its line's "
        "exact sum, rounded once, half up"
    )


def show_page(run: DemoRun, *, serve: bool) -> None:
    """Print the first tenant's page address with a development token; with `serve`, serve the
    API for it until SIGINT/SIGTERM."""
    settings, tenant = run.settings, run.tenants[0]
    secret = dev_api_secret(settings)
    from_env = settings.api_jwt_secret is not None
    token = dev_token(secret, audience=settings.api_jwt_audience, tenant_id=tenant)
    if serve:
        _serve_page(serving_settings(settings, secret), token, tenant=tenant, from_env=from_env)
        return
    port = settings.api_port or DEFAULT_DEMO_PORT
    heading(f"The page of {tenant}")
    print_page_access(token, page_url(port, tenant), tenant=tenant, secret_from_env=from_env)
    print_how_to_serve(port, secret_from_env=from_env)


def _serve_page(settings: Settings, token: str, *, tenant: str, from_env: bool) -> None:
    from llm_usage.api.server import serve_api  # noqa: PLC0415 - the web stack, when asked for

    def listening(_host: str, port: int) -> None:
        heading(f"The page of {tenant}")
        print_page_access(token, page_url(port, tenant), tenant=tenant, secret_from_env=from_env)
        print("  Serving the API here until Ctrl-C.", flush=True)

    asyncio.run(serve_api(settings, on_listening=listening))
    print("Stopped serving the API.")


def dev_token(
    secret: str,
    *,
    audience: str,
    tenant_id: str,
    role: Role = Role.TENANT_ADMIN,
    hours: int = DEV_TOKEN_HOURS,
) -> str:
    """A token for `tenant_id`, valid for `hours`, signed with `secret`."""
    claims = {
        "aud": audience,
        "exp": int(time.time()) + hours * 3600,
        "sub": "demo@localhost",
        "role": role.value,
        "tenant_id": tenant_id,
    }
    return jwt.encode(claims, secret, algorithm=SECRET_ALGORITHM)


async def invoice_lines(
    settings: Settings, *, period: str, tenants: list[str]
) -> list[InvoiceLine]:
    """Run the rollup for `period` as `llm-usage rollup run --period --tenant` does, per tenant."""
    pool = await create_pool(settings.database_url, size=1)
    try:
        lines = []
        for tenant in tenants:
            lines += (await run_rollup(pool, period=period, tenant_id=tenant)).lines
        return lines
    finally:
        await pool.close()


def print_invoice_lines(
    lines: list[InvoiceLine], exact: Mapping[tuple[str, str | None], Decimal]
) -> None:
    """A compact table: each line's amount beside the exact sum of the stream's events it bills."""
    header = f"  {'tenant':<18}{'deployment':<14}{'requests':>9}{'tokens':>10}"
    print(f"{header}{'exact USD (stream)':>22}{'amount':>10}")
    for line in lines:
        deployment = line.deployment_id if line.deployment_id is not None else "(none)"
        print(
            f"  {line.tenant_id:<18}{deployment:<14}{line.meta.get('requests', 0):>9}"
            f"{line.qty:>10}{exact.get((line.tenant_id, line.deployment_id), Decimal(0)):>22}"
            f"{dollars(line.amount_cents):>10}"
        )


def page_url(port: int, tenant: str) -> str:
    return f"http://{DEMO_API_HOST}:{port}/ui/tenants/{tenant}"


def print_page_access(token: str, url: str, *, tenant: str, secret_from_env: bool) -> None:
    """How to open `url` with `token`: a sign-in link for a browser, and curl."""
    print(f"  {url}")
    print(f"  A development token (tenant-admin of {tenant}, valid {DEV_TOKEN_HOURS} h):")
    print(f"    {token}")
    print("  In a browser, open this once (the page keeps the token in a cookie):")
    print(f"    {url}?{UI_TOKEN_PARAMETER}={token}")
    print("  With curl:")
    print(f'    curl -H "Authorization: Bearer {token}" {url}')
    if secret_from_env:
        print("  The token is signed with your API_JWT_SECRET.")
    else:
        print(f"  The token is signed with the development secret in {dev_secret_path()}.")


def print_how_to_serve(port: int, *, secret_from_env: bool) -> None:
    secret = (
        "" if secret_from_env else f'API_JWT_SECRET="$(cat {shlex.quote(str(dev_secret_path()))})" '
    )
    print(
        "  The API is not running now. Serve it with `llm-usage demo --open` next time, or:\n"
        '    eval "$(.venv/bin/llm-usage dev env)"\n'
        f"    {secret}API_HOST={DEMO_API_HOST} API_PORT={port} .venv/bin/llm-usage serve api"
    )


def serving_settings(settings: Settings, secret: str) -> Settings:
    """The settings `--open` serves the API with: this machine only, the demo's secret."""
    return settings.model_copy(
        update={
            "api_host": DEMO_API_HOST,
            "api_jwt_secret": SecretStr(secret),
            "api_jwt_jwks_file": None,
        }
    )
