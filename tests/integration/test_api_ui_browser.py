"""The page in a real headless Chromium against a real `llm-usage serve api` and PostgreSQL: the
numbers people see are the API's, and a screenshot is kept as a test artifact.

Needs Debian's `chromium` and the `playwright` package (which drives that binary; no browser of
its own is downloaded); without them the test is skipped, or fails under CI=true.
"""

from __future__ import annotations

import importlib
import os
import random
import shutil
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from llm_usage.api.ui_money import count_text, usd_text
from llm_usage.consumers.budget.handler import BudgetCounter
from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.domain.budgets import ScopeType
from llm_usage.domain.policies import BudgetPolicy
from llm_usage.storage.budget_policies import set_policy
from tests import clock
from tests.api_support import bearer, token
from tests.integration.pipeline import encode, unique, usage_event
from tests.integration.test_api_serve import server  # noqa: F401 - the fixture
from tests.records import consumer_record
from tests.unavailable import service_unavailable

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", "build/test-artifacts"))


@pytest.fixture
def artifacts() -> Path:
    """Where the screenshot is kept ($TEST_ARTIFACTS_DIR, else build/test-artifacts)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


async def _usage(pool: asyncpg.Pool, tenant: str, now: datetime) -> None:
    rng = random.Random(11)
    events = [
        usage_event(
            tenant,
            occurred_at=(now - timedelta(seconds=rng.randrange(40 * 86400))).isoformat(),
            customer_charge_usd=str(Decimal(rng.randrange(1, 10**6)).scaleb(-4)),
            model=rng.choice(["gpt-4o", "gpt-4o-mini", "claude", "gemini", None]),
            user_id=rng.choice(["ann", "bob", "cyd", "dan", "eve", "fay", None]),
        )
        for _ in range(300)
    ]
    records = [consumer_record(encode(e), offset=n) for n, e in enumerate(events)]
    await UsageRecorder(pool=pool, clock=clock.now).record_batch(records)
    await BudgetCounter(pool=pool, clock=clock.now).record_batch(records)


async def test_the_page_in_chromium_shows_the_apis_numbers(
    server: tuple[Any, str],  # noqa: F811 - the fixture imported above
    pool: asyncpg.Pool,
    artifacts: Path,
) -> None:
    if CHROMIUM is None:
        service_unavailable("no chromium on PATH (apt-get install chromium; .ci/run does)")
    try:
        playwright_api = importlib.import_module("playwright.async_api")
    except ImportError:
        service_unavailable("playwright is not installed (it is a dev dependency: make install)")
    _, base = server
    tenant = unique("tenant")
    async with pool.acquire() as connection:
        for policy in (
            BudgetPolicy(tenant, ScopeType.TENANT, tenant, Decimal("5"), Decimal("100000")),
            BudgetPolicy(tenant, ScopeType.USER, "ann", monthly_limit_usd=Decimal("40")),
        ):
            await set_policy(connection, policy, actor="test")
    await clock.clear_of_midnight()  # the API's answers and the page must show the same day
    now = clock.now()
    await _usage(pool, tenant, now)
    member = token("tenant-member", tenant)
    async with httpx.AsyncClient(base_url=base, headers=bearer(member), timeout=10) as client:
        summary = (await client.get(f"/v1/tenants/{tenant}/usage/summary")).json()
        budgets = (await client.get(f"/v1/tenants/{tenant}/budgets")).json()["items"]
        daily = (await client.get(f"/v1/tenants/{tenant}/usage/daily")).json()["items"]
        models = (
            await client.get(
                f"/v1/tenants/{tenant}/usage/breakdown", params={"by": "model", "limit": "10"}
            )
        ).json()["items"]

    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            context = await browser.new_context(viewport={"width": 900, "height": 1400})
            await context.add_cookies([{"name": "llm_usage_token", "value": member, "url": base}])
            page = await context.new_page()
            answer = await page.goto(f"{base}/ui/tenants/{tenant}")
            assert answer is not None
            assert answer.status == 200
            month_text = await page.inner_text("#month")
            budget_texts = await page.eval_on_selector_all(
                ".budget", "elements => elements.map(e => e.innerText)"
            )
            bars = await page.eval_on_selector_all(
                "rect.day",
                "elements => elements.map(e => [e.dataset.date, e.dataset.charge, "
                "e.getBoundingClientRect().height])",
            )
            # The hover text of each day's column: an SVG <title>, which browsers show as a tooltip.
            hovers = await page.eval_on_selector_all(
                "svg g.column > title", "titles => titles.map(t => t.textContent)"
            )
            ticks = await page.eval_on_selector_all(
                "svg text.tick",
                "ticks => ticks.map(t => [t.textContent, t.getBoundingClientRect().width])",
            )
            model_rows = await page.eval_on_selector_all(
                "tr.top[data-by=model]",
                "rows => rows.map(r => Array.from(r.cells).map(c => c.innerText))",
            )
            amount_titles = await page.eval_on_selector_all(
                "span.usd", "spans => spans.map(s => [s.textContent, s.title])"
            )
            # The table of every day opens without JavaScript.
            assert not await page.is_visible("tr.day-row")
            await page.click("details > summary")
            assert await page.is_visible("tr.day-row")
            await page.screenshot(path=str(artifacts / "ui-tenant-page.png"), full_page=True)
        finally:
            await browser.close()

    assert usd_text(Decimal(summary["customer_charge_usd"])) in month_text
    assert f"{count_text(summary['requests'])} requests" in month_text
    assert len(budget_texts) == len(budgets) == 3
    assert {budget["level"] for budget in budgets} >= {"ok", "exceeded"}
    for text, budget in zip(budget_texts, budgets, strict=True):
        spend, limit = Decimal(budget["spend_usd"]), Decimal(budget["limit_usd"])
        assert f"{usd_text(spend)} of {usd_text(limit)} ({budget['percent']} %)" in text
        assert budget["level"] in text
        assert (" h of 24 h" if budget["window"] == "daily" else f"day {now.day} of ") in text
    assert [(date, charge) for date, charge, _ in bars] == [
        (day["date"], day["customer_charge_usd"]) for day in daily
    ]
    # The highest day is drawn the tallest; a day without spend is not drawn at all.
    heights = {date: height for date, _, height in bars}
    highest = max(daily, key=lambda day: Decimal(day["customer_charge_usd"]))
    assert heights[highest["date"]] == max(heights.values()) > 0
    assert all(
        heights[day["date"]] == 0 for day in daily if Decimal(day["customer_charge_usd"]) == 0
    )
    assert len(hovers) == len(daily) == 30
    for hover, day in zip(hovers, daily, strict=True):
        exact, requests = day["customer_charge_usd"], count_text(day["requests"])
        assert f"{usd_text(Decimal(exact))} ({exact} USD), {requests} requests" in hover
    # A labelled money axis: a few gridlines, from $0 up to at least the highest day.
    assert 3 <= len(ticks) <= 5
    assert all(width > 0 for _, width in ticks)
    assert ticks[0][0] in {"$0", "$0.00"}
    top = Decimal(ticks[-1][0].removeprefix("$").replace(",", ""))
    assert top >= Decimal(highest["customer_charge_usd"])
    assert model_rows == [
        [
            m["key"] or "none",
            count_text(m["requests"]),
            count_text(m["input_tokens"] + m["output_tokens"]),
            usd_text(Decimal(m["customer_charge_usd"])),
        ]
        for m in models
    ]
    assert amount_titles
    for shown, title in amount_titles:
        exact = title.removesuffix(" USD")
        assert shown == usd_text(Decimal(exact))
    assert (artifacts / "ui-tenant-page.png").stat().st_size > 10_000
