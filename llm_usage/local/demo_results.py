"""What the demo shows after its stream: the month's invoice lines and the tenant's page."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from decimal import Decimal

from pydantic import SecretStr

from llm_usage.api.guards import UI_TOKEN_PARAMETER
from llm_usage.core.settings import Settings
from llm_usage.domain.invoices import InvoiceLine
from llm_usage.local.dev_token import DEV_TOKEN_HOURS, dev_secret_path
from llm_usage.rollup.run import run_rollup
from llm_usage.storage.pool import create_pool

DEMO_API_HOST = "127.0.0.1"
DEFAULT_DEMO_PORT = 8080


def dollars(cents: int) -> str:
    """`$1,234.57` for 123457 cents."""
    return f"${Decimal(cents).scaleb(-2):,.2f}"


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
