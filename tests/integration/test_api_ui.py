"""The page for people shows the API's own numbers, section by section: today and this month,
budgets, the last 30 days, the top 10 models, users and agents, this month's alerts and (for
tenant admins) its preview invoice lines. Every figure is compared through its `data-` attribute
with the exact string the API answers for the same tenant and clock."""

from __future__ import annotations

import random
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx

from llm_usage.api.ui_money import usd_text
from llm_usage.domain.budgets import Enforcement, ScopeType
from llm_usage.domain.periods import start_of_month
from llm_usage.domain.policies import BudgetPolicy
from llm_usage.rollup.run import run_rollup
from llm_usage.storage.budget_holds import place_check
from llm_usage.storage.budget_policies import set_policy
from tests.api_support import api_client, bearer, token
from tests.integration.pipeline import unique, usage_event
from tests.integration.test_api_reports import NOW, _random_events, _store

# A user id that needs URL-encoding, to check the link to the user's events.
ODD_USER = "ann & bob/ü?x=1"
ODD_AGENT = "agent <&> co"
LATE_TODAY = NOW - timedelta(minutes=1)
THIS_MONTH = f"{NOW:%Y-%m}"


class _Elements(HTMLParser):
    """Every element's attributes, by tag and class, and the text of the ones asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []
        self.texts: list[str] = []  # the text inside each element, in document order
        self._open: list[int] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {name: value or "" for name, value in attrs}))
        self.texts.append("")
        if tag not in {"meta", "line", "rect", "br", "input", "link"}:
            self._open.append(len(self.found) - 1)

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for index in self._open:
            self.texts[index] += data

    def with_class(self, name: str) -> list[dict[str, str]]:
        return [attrs for _, attrs in self.found if name in attrs.get("class", "").split()]

    def text_with_class(self, name: str) -> list[tuple[dict[str, str], str]]:
        return [
            (attrs, self.texts[index])
            for index, (_, attrs) in enumerate(self.found)
            if name in attrs.get("class", "").split()
        ]

    def by_id(self, name: str) -> dict[str, str]:
        [attrs] = [attrs for _, attrs in self.found if attrs.get("id") == name]
        return attrs

    def tags(self, tag: str) -> list[dict[str, str]]:
        return [attrs for found, attrs in self.found if found == tag]


def _parse(text: str) -> _Elements:
    html = _Elements()
    html.feed(text)
    return html


async def _tenant_with_usage(pool: asyncpg.Pool) -> str:
    """A tenant with two months of usage, budgets at every level (one blocking, some with a
    budget check's hold open) and published alerts."""
    tenant = unique("tenant")
    async with pool.acquire() as connection:
        for policy in (
            BudgetPolicy(tenant, ScopeType.TENANT, tenant, Decimal("1"), Decimal("80")),
            BudgetPolicy(
                tenant,
                ScopeType.USER,
                "user_id-a",
                monthly_limit_usd=Decimal("1e9"),
                enforcement=Enforcement.BLOCK,
            ),
            BudgetPolicy(tenant, ScopeType.USER, ODD_USER, daily_limit_usd=Decimal("0.5")),
            BudgetPolicy(tenant, ScopeType.AGENT, ODD_AGENT, Decimal("0.0000012"), None, 80),
        ):
            await set_policy(connection, policy, actor="test")
    odd = [
        usage_event(
            tenant,
            user_id=ODD_USER,
            agent_id=ODD_AGENT,
            customer_charge_usd="0.000001",
            occurred_at=LATE_TODAY.isoformat(),
        ),
        usage_event(
            tenant, user_id=ODD_USER, customer_charge_usd="0.7", occurred_at=LATE_TODAY.isoformat()
        ),
    ]
    await _store(pool, _random_events(tenant, 200, random.Random(3)) + odd)
    async with pool.acquire() as connection:
        # As the outbox relay marks what the alerts topic acknowledged; decided at the tests'
        # clock (the outbox stamps the database's own time), so they are "this month's".
        await connection.execute(
            "UPDATE budget_alert_outbox SET published_at = $2, created_at = $2 "
            "WHERE tenant_id = $1",
            tenant,
            LATE_TODAY,
        )
        outcome = await place_check(
            connection,
            tenant_id=tenant,
            gateway_request_id=unique("check"),
            deployment_id=None,
            user_id="user_id-a",
            agent_id=None,
            amount_usd=Decimal("0.25"),
            now=LATE_TODAY,
            hold_seconds=300,
        )
        assert outcome.decision == "allow", outcome
    return tenant


async def _api(client: httpx.AsyncClient, tenant: str, headers: dict[str, str]) -> dict[str, Any]:
    """The API's answers for what the page shows, at the same clock."""
    base = f"/v1/tenants/{tenant}"
    midnight = datetime.combine(NOW.date(), time(0), UTC).isoformat()

    async def get(path: str, **params: str) -> Any:
        answer = await client.get(base + path, params=params, headers=headers)
        assert answer.status_code == 200, answer.text
        return answer.json()

    return {
        "month": await get("/usage/summary"),
        "today": await get("/usage/summary", **{"from": midnight}),
        "budgets": (await get("/budgets"))["items"],
        "daily": (await get("/usage/daily"))["items"],
        "top": {
            by: (await get("/usage/breakdown", by=by, limit="10"))["items"]
            for by in ("model", "user", "agent")
        },
        "alerts": (await get("/alerts", since=start_of_month(NOW).isoformat(), limit="20"))[
            "items"
        ],
    }


def _summary(tile: dict[str, str]) -> dict[str, Any]:
    return {
        "requests": int(tile["data-requests"]),
        "input_tokens": int(tile["data-input-tokens"]),
        "output_tokens": int(tile["data-output-tokens"]),
        "total_tokens": int(tile["data-total-tokens"]),
        "customer_charge_usd": tile["data-charge"],
        "estimated_charge_usd": tile["data-estimated"],
    }


def _items(answer: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: answer[name] for name in names}


async def test_the_page_shows_the_apis_numbers(pool: asyncpg.Pool) -> None:
    tenant = await _tenant_with_usage(pool)
    await run_rollup(pool, period=THIS_MONTH, tenant_id=tenant)
    headers = bearer(token("tenant-admin", tenant))
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        page = await client.get(f"/ui/tenants/{tenant}", headers=headers)
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-store"
        api = await _api(client, tenant, headers)
        lines = await client.get(
            f"/v1/tenants/{tenant}/invoice-lines", params={"period": THIS_MONTH}, headers=headers
        )
    html = _parse(page.text)
    names = (
        "requests",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "customer_charge_usd",
        "estimated_charge_usd",
    )

    # Today and this month.
    assert _summary(html.by_id("month")) == _items(api["month"], *names)
    assert _summary(html.by_id("today")) == _items(api["today"], *names)
    assert 0 < api["today"]["requests"] < api["month"]["requests"]

    # Budgets, with how far into their period each is (NOW is noon of a day of November).
    shown_budgets = [
        {
            "scope_type": b["data-scope-type"],
            "scope_id": b["data-scope-id"],
            "window": b["data-window"],
            "period_start": b["data-period-start"],
            "spend_usd": b["data-spend"],
            "limit_usd": b["data-limit"],
            "percent": b["data-percent"],
            "level": b["data-level"],
            "held_usd": b["data-held"],
            "enforcement": b["data-enforcement"],
        }
        for b in html.with_class("budget")
    ]
    assert shown_budgets == api["budgets"]
    held_shown = [b for b in shown_budgets if b["held_usd"] != "0"]
    assert [(b["scope_type"], b["held_usd"]) for b in held_shown] == [
        ("tenant", "0.25"),
        ("tenant", "0.25"),
        ("user", "0.25"),
    ]
    blocking = [b for b in html.with_class("budget") if b["data-enforcement"] == "block"]
    assert [b["data-scope-id"] for b in blocking] == ["user_id-a"]
    assert page.text.count(" · blocks</span>") == 1
    assert {b["level"] for b in shown_budgets} == {"ok", "warning", "exceeded"}
    assert {b["data-window"]: b["data-progress"] for b in html.with_class("budget")} == {
        "daily": "12 h of 24 h",
        "monthly": f"day {NOW.day} of 30",
    }

    # The 30 days: each bar (oldest first) and each row of the table under the chart (newest
    # first).
    for css_class, order in (("day", 1), ("day-row", -1)):
        days = [
            {
                "date": d["data-date"],
                "requests": int(d["data-requests"]),
                "customer_charge_usd": d["data-charge"],
                "estimated_charge_usd": d["data-estimated"],
            }
            for d in html.with_class(css_class)
        ]
        assert days[::order] == api["daily"]
    assert len(api["daily"]) == 30
    titles = [text for attrs, text in html.text_with_class("column")]
    assert len(titles) == 30
    for day, title in zip(api["daily"], titles, strict=True):
        assert f"({day['customer_charge_usd']} USD)" in title
    # The money axis: gridlines labelled in dollars, the top one at or above the highest day.
    ticks = [text for _, text in html.text_with_class("tick")]
    assert ticks[0] == "$0" or ticks[0].startswith("$0.0")
    highest = max(Decimal(day["customer_charge_usd"]) for day in api["daily"])
    assert Decimal(ticks[-1].removeprefix("$").replace(",", "")) >= highest > 0
    assert len([text for _, text in html.text_with_class("day-label")]) == 5

    # The top 10 of each; users link to their events.
    for by in ("model", "user", "agent"):
        rows = [r for r in html.with_class("top") if r["data-by"] == by]
        assert [
            {
                "key": None if r["data-null"] == "true" else r["data-key"],
                "requests": int(r["data-requests"]),
                "customer_charge_usd": r["data-charge"],
                "estimated_charge_usd": r["data-estimated"],
            }
            for r in rows
        ] == [
            _items(item, "key", "requests", "customer_charge_usd", "estimated_charge_usd")
            for item in api["top"][by]
        ]
        assert rows
    # "of which estimated $X" under every amount part of which was estimated, and only there.
    assert Decimal(api["month"]["estimated_charge_usd"]) > 0
    amounts = [*html.with_class("tile"), *html.with_class("day-row"), *html.with_class("top")]
    shown = [
        Decimal(amount["data-estimated"]) for amount in amounts if amount["data-estimated"] != "0"
    ]
    notes = html.text_with_class("estimated")
    assert len(notes) == len(shown) > 0
    for estimated, (_, text) in zip(shown, notes, strict=True):
        assert text == f"of which estimated {usd_text(estimated)}"
    assert len(amounts) > len(shown)  # some amounts have no estimated part
    links = {a["href"] for a in html.tags("a")}
    for item in api["top"]["user"]:
        if item["key"] is not None:
            user = quote(item["key"], safe="")
            assert f"/ui/tenants/{quote(tenant, safe='')}/events?user_id={user}" in links
    assert f"/ui/tenants/{tenant}/events?user_id=ann%20%26%20bob%2F%C3%BC%3Fx%3D1" in links

    # This month's alerts, newest first, each with the period it is for.
    fields: tuple[str, ...] = (
        "alert_id",
        "level",
        "threshold_pct",
        "spend_usd",
        "limit_usd",
        "scope_type",
        "scope_id",
        "window",
        "period_start",
    )
    assert [
        {name: a[f"data-{name.replace('_', '-')}"] for name in fields}
        for a in html.with_class("alert")
    ] == [{name: str(alert[name]) for name in fields} for alert in api["alerts"]]
    assert api["alerts"]
    assert ("alerts-more" in page.text) == (len(api["alerts"]) == 20)

    # This month's preview invoice lines, as the finance route answers them.
    assert lines.status_code == 200, lines.text
    assert [
        {
            "deployment_id": None if line["data-null"] == "true" else line["data-deployment"],
            "kind": line["data-kind"],
            "qty": int(line["data-qty"]),
            "amount_cents": int(line["data-amount-cents"]),
        }
        for line in html.with_class("line")
    ] == [
        _items(line, "deployment_id", "kind", "qty", "amount_cents")
        for line in lines.json()["items"]
    ]
    assert lines.json()["items"]
    assert int(html.by_id("lines-total")["data-amount-cents"]) == sum(
        line["amount_cents"] for line in lines.json()["items"]
    )

    # Every amount reads as dollars and cents, the exact figure a hover away.
    usd_spans = html.text_with_class("usd")
    tops = sum(len(items) for items in api["top"].values())
    estimated_shown = len(html.with_class("estimated"))  # each holds an amount of its own
    assert len(usd_spans) == (
        2
        + 2 * len(api["budgets"])
        + len(held_shown)
        + 30
        + tops
        + 2 * len(api["alerts"])
        + estimated_shown
    )
    for attrs, text in usd_spans:
        assert text == usd_text(Decimal(attrs["data-usd"]))
        assert attrs["title"] == f"{attrs['data-usd']} USD"
    assert "<$0.01" in {text for _, text in usd_spans}
    assert " USD<" not in page.text  # no amount usd_spans as a raw decimal


async def test_a_member_sees_the_page_without_invoice_lines(pool: asyncpg.Pool) -> None:
    tenant = await _tenant_with_usage(pool)
    await run_rollup(pool, period=THIS_MONTH, tenant_id=tenant)
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        member = bearer(token("tenant-member", tenant))
        page = await client.get(f"/ui/tenants/{tenant}", headers=member)
        assert page.status_code == 200, page.text
        assert (
            await client.get(
                f"/v1/tenants/{tenant}/invoice-lines", params={"period": THIS_MONTH}, headers=member
            )
        ).status_code == 403
        admin_page = await client.get(
            f"/ui/tenants/{tenant}", headers=bearer(token("platform-admin"))
        )
    html = _parse(page.text)
    assert html.with_class("line") == []
    assert "Invoice lines are shown to tenant admins." in page.text
    # Everything else is there, as for an admin.
    assert html.with_class("budget")
    assert html.with_class("top")
    assert html.with_class("alert")
    assert _parse(admin_page.text).with_class("line")


async def test_before_the_rollup_runs_the_page_says_no_preview_yet(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        page = await client.get(
            f"/ui/tenants/{tenant}", headers=bearer(token("tenant-admin", tenant))
        )
    assert page.status_code == 200, page.text
    html = _parse(page.text)
    assert html.by_id("no-preview")
    [refresh] = [m for m in html.tags("meta") if m.get("http-equiv") == "refresh"]
    assert int(refresh["content"]) == 300
    assert "No preview yet" in page.text
    assert html.by_id("month")["data-charge"] == "0"
    assert html.by_id("month")["data-estimated"] == "0"
    assert not html.with_class("estimated")
    assert len(html.with_class("day")) == 30


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


async def test_a_sign_in_link_leads_back_to_its_own_tenant_whatever_its_id_holds(
    pool: asyncpg.Pool,
) -> None:
    # Decoded, `%2541` is `%41`, which a browser reads as `A`: the page of another tenant.
    tenant = f"{unique('tenant')} a%41b"
    lookalike = tenant.replace("%41", "A")
    address = f"/ui/tenants/{quote(tenant, safe='')}"
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        signed_in = await client.get(address, params={"token": token("tenant-member", tenant)})
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == address
        assert address.endswith("%20a%2541b")
        page = await client.get(signed_in.headers["location"])
        assert page.status_code == 200, page.text
        assert (await client.get(f"/ui/tenants/{quote(lookalike, safe='')}")).status_code == 403


async def test_an_empty_link_token_is_no_token_and_keeps_the_cookie(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        assert (await client.get(f"/ui/tenants/{tenant}", params={"token": ""})).status_code == 401
        client.cookies.update({"llm_usage_token": token("tenant-member", tenant)})
        page = await client.get(f"/ui/tenants/{tenant}", params={"token": ""})
        assert page.status_code == 200, page.text
        assert "set-cookie" not in page.headers
        assert (await client.get(f"/ui/tenants/{tenant}")).status_code == 200


async def test_only_the_tenant_page_takes_a_token_from_the_address(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    valid = token("tenant-member", tenant)
    events = f"/ui/tenants/{tenant}/events"
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        assert (await client.get(events, params={"token": valid})).status_code == 401
        # With a cookie, a token in the address is neither checked nor kept.
        client.cookies.update({"llm_usage_token": valid})
        page = await client.get(events, params={"token": token("tenant-member", unique("t"))})
        assert page.status_code == 200, page.text
        assert "set-cookie" not in page.headers
        client.cookies.update({"llm_usage_token": token("tenant-member", unique("tenant"))})
        assert (await client.get(events, params={"token": valid})).status_code == 403
