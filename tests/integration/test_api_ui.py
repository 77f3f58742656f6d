"""The page for people shows the API's own numbers: budgets, the last 30 days, top models and
users, this month's spend."""

from __future__ import annotations

import random
from decimal import Decimal
from html.parser import HTMLParser

import asyncpg

from llm_usage.domain.budgets import ScopeType
from llm_usage.domain.policies import BudgetPolicy
from llm_usage.storage.budget_policies import set_policy
from tests.api_support import api_client, bearer, token
from tests.integration.pipeline import unique
from tests.integration.test_api_reports import NOW, _random_events, _store


class _Elements(HTMLParser):
    """Every element's attributes, by tag and class."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {name: value or "" for name, value in attrs}))

    def with_class(self, name: str) -> list[dict[str, str]]:
        return [attrs for _, attrs in self.found if name in attrs.get("class", "").split()]

    def by_id(self, name: str) -> dict[str, str]:
        [attrs] = [attrs for _, attrs in self.found if attrs.get("id") == name]
        return attrs


async def test_the_page_shows_the_apis_numbers(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    async with pool.acquire() as connection:
        await set_policy(
            connection,
            BudgetPolicy(tenant, ScopeType.TENANT, tenant, Decimal("1"), Decimal("80")),
            actor="test",
        )
        await set_policy(
            connection,
            BudgetPolicy(tenant, ScopeType.USER, "user_id-a", monthly_limit_usd=Decimal("1e9")),
            actor="test",
        )
    await _store(pool, _random_events(tenant, 200, random.Random(3)))
    headers = bearer(token("tenant-member", tenant))
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        page = await client.get(f"/ui/tenants/{tenant}", headers=headers)
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        summary = (await client.get(f"/v1/tenants/{tenant}/usage/summary", headers=headers)).json()
        budgets = (await client.get(f"/v1/tenants/{tenant}/budgets", headers=headers)).json()
        daily = (await client.get(f"/v1/tenants/{tenant}/usage/daily", headers=headers)).json()
        top = {
            by: (
                await client.get(
                    f"/v1/tenants/{tenant}/usage/breakdown",
                    params={"by": by, "limit": "5"},
                    headers=headers,
                )
            ).json()["items"]
            for by in ("model", "user")
        }
    html = _Elements()
    html.feed(page.text)
    month = html.by_id("month")
    assert (month["data-charge"], int(month["data-requests"])) == (
        summary["customer_charge_usd"],
        summary["requests"],
    )
    shown_budgets = [
        {
            "scope_type": b["data-scope-type"],
            "scope_id": b["data-scope-id"],
            "window": b["data-window"],
            "spend_usd": b["data-spend"],
            "limit_usd": b["data-limit"],
            "percent": b["data-percent"],
            "level": b["data-level"],
        }
        for b in html.with_class("budget")
    ]
    assert shown_budgets == [
        {k: v for k, v in item.items() if k != "period_start"} for item in budgets["items"]
    ]
    assert {b["level"] for b in shown_budgets} >= {"exceeded", "ok"}
    days = [
        {
            "date": d["data-date"],
            "requests": int(d["data-requests"]),
            "customer_charge_usd": d["data-charge"],
        }
        for d in html.with_class("day")
    ]
    assert days == daily["items"]
    assert len(days) == 30
    for by in ("model", "user"):
        rows = [r for r in html.with_class("top") if r["data-by"] == by]
        assert [
            {
                "key": None if r["data-null"] == "true" else r["data-key"],
                "requests": int(r["data-requests"]),
                "customer_charge_usd": r["data-charge"],
            }
            for r in rows
        ] == [{k: item[k] for k in ("key", "requests", "customer_charge_usd")} for item in top[by]]
        assert rows


async def test_a_browser_may_send_the_token_as_a_cookie_to_the_page_only(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("tenant")
    cookie = {"llm_usage_token": token("tenant-member", tenant)}
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        client.cookies.update(cookie)
        assert (await client.get(f"/ui/tenants/{tenant}")).status_code == 200
        assert (await client.get(f"/ui/tenants/{unique('tenant')}")).status_code == 403
        # The API itself never takes a cookie: a cross-site request could carry it.
        assert (await client.get(f"/v1/tenants/{tenant}/budgets")).status_code == 401
        client.cookies.clear()
        assert (await client.get(f"/ui/tenants/{tenant}")).status_code == 401


async def test_a_sign_in_link_keeps_a_valid_token_in_the_cookie_and_drops_it_from_the_address(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("tenant")
    valid = token("tenant-member", tenant)
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        signed_in = await client.get(f"/ui/tenants/{tenant}", params={"token": valid})
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == f"/ui/tenants/{tenant}"
        set_cookie = signed_in.headers["set-cookie"]
        assert set_cookie.startswith(f"llm_usage_token={valid};")
        assert "HttpOnly" in set_cookie
        assert "Path=/ui" in set_cookie
        assert (await client.get(f"/ui/tenants/{tenant}")).status_code == 200
        client.cookies.clear()
        forged = await client.get(f"/ui/tenants/{tenant}", params={"token": valid + "x"})
        assert forged.status_code == 401
        assert "set-cookie" not in forged.headers
        foreign = await client.get(f"/ui/tenants/{unique('tenant')}", params={"token": valid})
        assert foreign.status_code == 403
        # With a header, the header is the one checked: an unchecked link token is never kept.
        both = await client.get(
            f"/ui/tenants/{tenant}", params={"token": "unchecked"}, headers=bearer(valid)
        )
        assert both.status_code == 200
        assert "set-cookie" not in both.headers
