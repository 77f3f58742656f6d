"""The price table through the API: read by any role of any tenant, added to by platform admins
only (401, then 403, then 422), all or nothing, audited with the token's `sub`, money as exact
decimal strings both ways."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from llm_usage.domain.prices import PRICE_CHANGE_LEAD
from llm_usage.storage.prices import price_history
from tests import clock
from tests.api_support import api_client, bearer, token
from tests.integration.pipeline import unique
from tests.integration.test_prices_storage import db_now


def price_row(provider: str, model: str, at: datetime | None, **fields: str) -> dict[str, Any]:
    row: dict[str, Any] = {"provider": provider, "model": model, "input": "2.50", "output": "10"}
    if at is not None:
        row["effective_from"] = clock.iso(at)
    return {**row, **fields}


async def test_platform_admins_add_rows_any_role_reads_them_and_the_audit_names_the_sub(
    pool: asyncpg.Pool,
) -> None:
    provider = unique("openai")
    started = ((await db_now(pool)) - timedelta(days=30)).replace(microsecond=0)
    admin = bearer(token("platform-admin", sub="ops@platform"))
    body = [
        price_row(provider, "gpt-4o", started, cached_input="1.250", request_fee_usd="0.0001"),
        price_row(provider, "gpt-4o-mini", started, input="1.5E-1", output="0.6"),
    ]
    async with api_client(pool) as (client, _):
        put = await client.put("/v1/prices", content=json.dumps(body), headers=admin)
        assert put.status_code == 200, put.text
        assert put.json()["unchanged"] == []
        assert put.json()["added"][0] == {
            "provider": provider,
            "model": "gpt-4o",
            "effective_from": started.isoformat().replace("+00:00", "Z"),
            "input": "2.5",
            "cached_input": "1.25",
            "output": "10",
            "reasoning": "10",
            "request_fee_usd": "0.0001",
        }
        again = await client.put("/v1/prices", content=json.dumps(body[1]), headers=admin)
        assert again.json()["added"] == []
        assert [row["input"] for row in again.json()["unchanged"]] == ["0.15"]

        # Any role of any tenant reads the table: it belongs to no tenant.
        member = bearer(token("tenant-member", unique("tenant")))
        listed = await client.get("/v1/prices", params={"provider": provider}, headers=member)
        assert listed.status_code == 200, listed.text
        assert [(r["model"], r["input"]) for r in listed.json()["items"]] == [
            ("gpt-4o", "2.5"),
            ("gpt-4o-mini", "0.15"),
        ]
        before = clock.iso(started - timedelta(seconds=1))
        none_yet = await client.get(
            "/v1/prices", params={"provider": provider, "at": before}, headers=member
        )
        assert none_yet.json() == {"items": []}

    async with pool.acquire() as connection:
        history = await price_history(connection, provider)
    assert [(c.actor, c.model) for c in history] == [
        ("ops@platform", "gpt-4o-mini"),
        ("ops@platform", "gpt-4o"),
    ]


async def test_a_refused_row_is_a_409_with_its_reason_and_adds_nothing(pool: asyncpg.Pool) -> None:
    provider = unique("anthropic")
    now = await db_now(pool)
    admin = bearer(token("platform-admin"))
    async with api_client(pool) as (client, _):
        first = price_row(provider, "claude", now - timedelta(days=1))
        assert (await client.put("/v1/prices", json=first, headers=admin)).status_code == 200
        body = [
            price_row(provider, "haiku", now - timedelta(days=1)),  # alone it would be added
            price_row(provider, "claude", now + timedelta(minutes=1), input="3"),
        ]
        refused = await client.put("/v1/prices", json=body, headers=admin)
        assert refused.status_code == 409, refused.text
        detail = refused.json()["detail"]
        assert detail.startswith(f"{provider}/claude already has prices: a change must take")
        assert "\n" not in detail

        different = await client.put("/v1/prices", json={**first, "output": "11"}, headers=admin)
        assert different.status_code == 409
        assert "already has a different row" in different.json()["detail"]

        listed = await client.get("/v1/prices", params={"provider": provider}, headers=admin)
    assert [row["model"] for row in listed.json()["items"]] == ["claude"]


async def test_without_effective_from_the_database_clock_picks_the_earliest_allowed(
    pool: asyncpg.Pool,
) -> None:
    provider = unique("google")
    admin = bearer(token("platform-admin"))
    async with api_client(pool) as (client, _):
        before = await db_now(pool)
        created = await client.put(
            "/v1/prices", json=price_row(provider, "gemini", None), headers=admin
        )
        changed = await client.put(
            "/v1/prices", json=[price_row(provider, "gemini", None, input="3")], headers=admin
        )
        after = await db_now(pool)
        mixed = await client.put(
            "/v1/prices",
            json=[price_row(provider, "a", None), price_row(provider, "b", before)],
            headers=admin,
        )
    assert created.status_code == 200, created.text
    assert changed.status_code == 200, changed.text
    start = datetime.fromisoformat(created.json()["added"][0]["effective_from"])
    change = datetime.fromisoformat(changed.json()["added"][0]["effective_from"])
    assert before <= start <= after
    assert before + PRICE_CHANGE_LEAD <= change <= after + PRICE_CHANGE_LEAD
    assert mixed.status_code == 422
    assert mixed.json()["detail"][0]["msg"] == "give effective_from in every row or in none"


async def test_who_may_add_is_judged_before_the_body(pool: asyncpg.Pool) -> None:
    provider = unique("mistral")
    tenant = unique("tenant")
    good = json.dumps(price_row(provider, "large", clock.now()))
    async with api_client(pool) as (client, _):
        nobody = await client.put("/v1/prices", content=good)
        assert nobody.status_code == 401
        for role in ("tenant-member", "tenant-admin"):
            for body in (good, "{not json"):
                answer = await client.put(
                    "/v1/prices", content=body, headers=bearer(token(role, tenant))
                )
                assert answer.status_code == 403, (role, answer.text)
        number = await client.put(
            "/v1/prices",
            content=json.dumps({**json.loads(good), "output": 10}),
            headers=bearer(token("platform-admin")),
        )
        assert number.status_code == 422
        assert ["body", "output"] in [error["loc"] for error in number.json()["detail"]]
        listed = await client.get(
            "/v1/prices", params={"provider": provider}, headers=bearer(token("platform-admin"))
        )
    assert listed.json() == {"items": []}
