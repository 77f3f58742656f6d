"""Budget policies through the API: the rules of `llm-usage policy`, audited with the token's
`sub` as the actor."""

from __future__ import annotations

import json

import asyncpg

from llm_usage.storage.budget_policies import policy_history
from tests.api_support import api_client, bearer, token
from tests.integration.pipeline import unique


async def test_put_get_delete_are_audited_with_the_callers_sub(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    admin = bearer(token("tenant-admin", tenant, sub="carol@acme"))
    platform = bearer(token("platform-admin", sub="ops-bot"))
    url = f"/v1/tenants/{tenant}/budget-policies"
    async with api_client(pool) as (client, _):
        created = await client.put(
            url,
            content=json.dumps(
                {"scope_type": "deployment", "scope_id": "dep-7", "daily_limit_usd": "100.00"}
            ),
            headers=admin,
        )
        assert created.status_code == 200, created.text
        assert created.json() == {
            "result": "created",
            "policy": {
                "tenant_id": tenant,
                "scope_type": "deployment",
                "scope_id": "dep-7",
                "daily_limit_usd": "100",
                "monthly_limit_usd": None,
                "warn_threshold_pct": 80,
                "enforcement": "alert",
            },
            "previous": None,
        }
        # The same limits spelled otherwise change nothing and audit nothing.
        unchanged = await client.put(
            url,
            content=json.dumps(
                {"scope_type": "deployment", "scope_id": "dep-7", "daily_limit_usd": "1E+2"}
            ),
            headers=admin,
        )
        assert unchanged.json()["result"] == "unchanged"
        # The whole policy is replaced: the daily limit left out is removed.
        replaced = await client.put(
            url,
            content=json.dumps(
                {
                    "scope_type": "deployment",
                    "scope_id": "dep-7",
                    "monthly_limit_usd": "2500.5",
                    "warn_threshold_pct": 90,
                    "daily_limit_usd": None,
                }
            ),
            headers=platform,
        )
        assert replaced.json()["result"] == "replaced"
        assert replaced.json()["previous"]["daily_limit_usd"] == "100"
        assert replaced.json()["policy"]["daily_limit_usd"] is None
        tenant_wide = await client.put(
            url,
            content=json.dumps({"scope_type": "tenant", "monthly_limit_usd": "5000"}),
            headers=admin,
        )
        assert tenant_wide.json()["policy"]["scope_id"] == tenant

        listed = await client.get(url, headers=bearer(token("tenant-member", tenant)))
        assert [(p["scope_type"], p["scope_id"]) for p in listed.json()["items"]] == [
            ("tenant", tenant),
            ("deployment", "dep-7"),
        ]

        deleted = await client.delete(
            url, params={"scope_type": "deployment", "scope_id": "dep-7"}, headers=admin
        )
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["result"] == "deleted"
        assert deleted.json()["previous"]["monthly_limit_usd"] == "2500.5"
        again = await client.delete(
            url, params={"scope_type": "deployment", "scope_id": "dep-7"}, headers=admin
        )
        assert again.status_code == 404
        assert "no deployment policy" in again.json()["detail"]

    async with pool.acquire() as connection:
        history = await policy_history(connection, tenant)
    assert [(entry.actor, entry.scope_type.value) for entry in history] == [
        ("carol@acme", "deployment"),
        ("ops-bot", "deployment"),
        ("carol@acme", "tenant"),
        ("carol@acme", "deployment"),
    ]
    assert history[-1].new_policy is None


async def test_policy_rules_are_the_command_lines(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    admin = bearer(token("tenant-admin", tenant))
    url = f"/v1/tenants/{tenant}/budget-policies"
    cases = {
        "daily_limit_usd": {"scope_type": "tenant", "daily_limit_usd": "0"},
        "monthly_limit_usd": {"scope_type": "tenant", "monthly_limit_usd": "1" * 13},
        "scope_id": {"scope_type": "tenant", "scope_id": "other", "daily_limit_usd": "1"},
        "scope_type": {"scope_type": "galaxy", "daily_limit_usd": "1"},
        "enforcement": {"scope_type": "tenant", "daily_limit_usd": "1", "enforcement": "deny"},
    }
    async with api_client(pool) as (client, _):
        for field, body in cases.items():
            answer = await client.put(url, content=json.dumps(body), headers=admin)
            assert answer.status_code == 422, (field, answer.text)
            assert ["body", field] in [error["loc"] for error in answer.json()["detail"]]
        listed = await client.get(url, headers=admin)
    assert listed.json() == {"items": []}


async def test_enforcement_alone_is_a_change_listed_and_audited(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    admin = bearer(token("tenant-admin", tenant, sub="carol@acme"))
    url = f"/v1/tenants/{tenant}/budget-policies"
    body = {"scope_type": "user", "scope_id": "u1", "monthly_limit_usd": "50"}
    async with api_client(pool) as (client, _):
        created = await client.put(url, content=json.dumps(body), headers=admin)
        assert created.json()["policy"]["enforcement"] == "alert"
        blocking = await client.put(
            url, content=json.dumps({**body, "enforcement": "block"}), headers=admin
        )
        assert blocking.status_code == 200, blocking.text
        assert blocking.json()["result"] == "replaced"
        assert blocking.json()["previous"]["enforcement"] == "alert"
        assert blocking.json()["policy"]["enforcement"] == "block"
        again = await client.put(
            url, content=json.dumps({**body, "enforcement": "block"}), headers=admin
        )
        assert again.json()["result"] == "unchanged"
        listed = await client.get(url, headers=bearer(token("tenant-member", tenant)))
        history = await client.get(f"{url}/history", headers=admin)
    assert [p["enforcement"] for p in listed.json()["items"]] == ["block"]
    # Newest first: the change of enforcement is the newest entry, the creation the oldest.
    changes = [
        (
            entry["old_policy"] and entry["old_policy"]["enforcement"],
            entry["new_policy"]["enforcement"],
        )
        for entry in history.json()["items"]
    ]
    assert changes == [("alert", "block"), (None, "alert")]
