"""`POST /v1/usage-events/{id}/corrections` and `GET /v1/usage-events/{id}` against a real broker
and database: who may call them, what is published (decoded as the consumers decode it), and
what is shown once the consumers have applied corrections (their rows written here directly)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from llm_usage.core.settings import Settings
from llm_usage.domain.corrections import Action, Correction
from llm_usage.schemas.decoding import decode_usage_topic_record
from tests import clock
from tests.api_support import api_client, bearer, token
from tests.integration.budget_check_support import serving
from tests.integration.correction_support import (
    add_correction,
    as_stored,
    park_correction,
    set_effective,
    store_event,
    utc_text,
)
from tests.integration.pipeline import (
    PipelineTopics,
    read_topic,
    topic_record_count,
    unique,
)


def admin_header() -> dict[str, str]:
    """A platform admin's header, minted when used: a token minted at import would expire while
    a long run reaches this module."""
    return bearer(token("platform-admin", sub="ops@example.com"))


def _corrections(gateway_request_id: str) -> str:
    return f"/v1/usage-events/{gateway_request_id}/corrections"


async def test_only_platform_admins_publish_corrections(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    body = {"action": "void", "reason": "test traffic", "tenant_id": tenant}
    async with api_client(pool, settings=topics.settings) as (client, _):
        url = _corrections(event["gateway_request_id"])
        assert (await client.post(url, json=body)).status_code == 401
        for role in ("tenant-admin", "tenant-member", "gateway"):
            answer = await client.post(url, json=body, headers=bearer(token(role, tenant)))
            assert answer.status_code == 403, (role, answer.text)
        # Access is judged before the body: a tenant admin's malformed body is still a 403.
        refused = await client.post(
            url, content=b"{", headers=bearer(token("tenant-admin", tenant))
        )
        assert refused.status_code == 403
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.usage) == 0


async def test_members_read_only_their_own_tenants_events(pool: asyncpg.Pool) -> None:
    tenant, other = unique("tenant"), unique("tenant")
    event = await store_event(pool, tenant)
    url = f"/v1/usage-events/{event['gateway_request_id']}"
    async with api_client(pool) as (client, _):
        for role in ("tenant-member", "tenant-admin"):
            mine = await client.get(url, headers=bearer(token(role, tenant)))
            assert mine.status_code == 200, mine.text
            assert mine.json()["event"]["tenant_id"] == tenant
            named = await client.get(
                url, params={"tenant_id": tenant}, headers=bearer(token(role, tenant))
            )
            assert named.status_code == 200
        # Another tenant's member: 403 when it names the tenant, 404 for its own (never the
        # event).
        theirs = await client.get(
            url, params={"tenant_id": tenant}, headers=bearer(token("tenant-member", other))
        )
        assert theirs.status_code == 403
        own = await client.get(url, headers=bearer(token("tenant-member", other)))
        assert own.status_code == 404
        assert event["gateway_request_id"] not in json.dumps(own.json()).replace(
            own.json()["detail"], ""
        )
        assert (await client.get(url, headers=bearer(token("gateway")))).status_code == 403
        assert (await client.get(url)).status_code == 401
        # A platform admin: the id window names the tenant, or it names it itself.
        for params in ({}, {"tenant_id": tenant}):
            admin = await client.get(url, params=params, headers=admin_header())
            assert admin.status_code == 200, admin.text
            assert admin.json()["event"]["gateway_request_id"] == event["gateway_request_id"]
        elsewhere = await client.get(url, params={"tenant_id": other}, headers=admin_header())
        assert elsewhere.status_code == 404


async def test_an_unstored_event_is_a_404_that_says_whether_a_correction_waits(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    missing = unique("req")
    async with api_client(pool, settings=topics.settings) as (client, _):
        # Nothing names the tenant: the window does not know the id.
        unnamed = await client.get(f"/v1/usage-events/{missing}", headers=admin_header())
        assert unnamed.status_code == 422
        assert unnamed.json()["detail"][0]["loc"] == ["query", "tenant_id"]
        assert "pass tenant_id" in unnamed.json()["detail"][0]["msg"]
        shown = await client.get(
            f"/v1/usage-events/{missing}", headers=bearer(token("tenant-member", tenant))
        )
        assert shown.status_code == 404
        assert shown.json()["waiting"] is False
        posted = await client.post(
            _corrections(missing),
            json={"action": "void", "reason": "x", "tenant_id": tenant},
            headers=admin_header(),
        )
        assert posted.status_code == 404
        await park_correction(pool, tenant, missing, unique("c"))
        waiting = await client.get(
            f"/v1/usage-events/{missing}", headers=bearer(token("tenant-member", tenant))
        )
        assert waiting.status_code == 404
        assert waiting.json()["waiting"] is True
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.usage) == 0


@pytest.mark.parametrize(
    ("body", "location"),
    [
        (b"{", ["body"]),
        (b"[]", ["body"]),
        ({"action": "delete", "reason": "x"}, ["body", "action"]),
        ({"action": "void"}, ["body", "reason"]),
        ({"action": "void", "reason": "x", "colour": "red"}, ["body", "colour"]),
        ({"action": "void", "reason": "x", "fields": {"user_id": "u"}}, ["body", "fields"]),
        ({"action": "amend", "reason": "x"}, ["body", "fields"]),
        ({"action": "amend", "reason": "x", "fields": {}}, ["body", "fields"]),
        (
            {"action": "amend", "reason": "x", "fields": {"input_token": 5}},
            ["body", "fields", "input_token"],
        ),
        (
            {"action": "amend", "reason": "x", "fields": {"model": "gpt-5"}},
            ["body", "fields", "model"],
        ),
        (
            {"action": "amend", "reason": "x", "fields": {"input_tokens": -1}},
            ["body", "fields", "input_tokens"],
        ),
        (
            {"action": "amend", "reason": "x", "fields": {"input_tokens": None}},
            ["body", "fields", "input_tokens"],
        ),
        (
            {"action": "amend", "reason": "x", "fields": {"user_id": "a\u0000"}},
            ["body", "fields", "user_id"],
        ),
        (
            {"action": "amend", "reason": "x", "fields": {"input_tokens": "7"}},
            ["body", "fields", "input_tokens"],
        ),
        (
            {"action": "amend", "reason": "x", "fields": {"customer_charge_usd": "1e400"}},
            ["body", "fields", "customer_charge_usd"],
        ),
        (
            {
                "action": "amend",
                "reason": "x",
                "fields": {"customer_charge_usd": "1.00", "customer_charge_cents": 150},
            },
            ["body"],
        ),
        ({"action": "void", "reason": ""}, ["body", "reason"]),
        ({"action": "void", "reason": "x" * 1001}, ["body", "reason"]),
        ({"action": "void", "reason": "x", "tenant_id": " t"}, ["body", "tenant_id"]),
        ({"action": "void", "reason": "x", "correction_id": ""}, ["body", "correction_id"]),
        ({"action": "void", "reason": "x", "occurred_at": "yesterday"}, ["body", "occurred_at"]),
        (
            {"action": "void", "reason": "x", "occurred_at": "2999-01-01T00:00:00Z"},
            ["body", "occurred_at"],
        ),
    ],
)
async def test_a_malformed_correction_is_a_422_and_publishes_nothing(
    topics: PipelineTopics, pool: asyncpg.Pool, body: Any, location: list[str]
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with api_client(pool, settings=topics.settings) as (client, _):
        answer = await client.post(
            _corrections(event["gateway_request_id"]), content=content, headers=admin_header()
        )
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == location, answer.json()
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.usage) == 0


async def _published(topics: PipelineTopics, expected: int = 1) -> list[Any]:
    records = await read_topic(
        topics.settings.kafka_bootstrap_servers, topics.usage, expected=expected
    )
    assert len(records) == expected
    return records


async def test_an_amend_is_published_complete_with_the_events_time_and_the_callers_sub(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant, agent_id="agent-1")
    now = clock.now()
    async with api_client(pool, settings=topics.settings, clock=lambda: now) as (client, _):
        answer = await client.post(
            _corrections(event["gateway_request_id"]),
            json={
                "action": "amend",
                "fields": {"input_tokens": 2000, "user_id": None},
                "reason": "billed in the wrong unit",
            },
            headers=admin_header(),
        )
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert uuid.UUID(body["correction_id"]).version == 4
    [record] = await _published(topics)
    assert record.key == tenant.encode()
    assert json.loads(record.value) == body["event"]
    decoded = decode_usage_topic_record(record.value, now=now)
    # Every corrigible field: the two asked for, the total they imply, the rest as stored.
    assert decoded == Correction(
        tenant_id=tenant,
        correction_id=body["correction_id"],
        gateway_request_id=event["gateway_request_id"],
        action=Action.AMEND,
        fields={
            "deployment_id": "dep-1",
            "user_id": None,
            "agent_id": "agent-1",
            "input_tokens": 2000,
            "output_tokens": 300,
            "cached_input_tokens": 0,
            "reasoning_tokens": 0,
            "total_tokens": 2300,
            "customer_charge_usd": Decimal("0.0054"),
            "customer_charge_cents": 1,
        },
        reason="billed in the wrong unit",
        actor="ops@example.com",
        occurred_at=now,
        event_occurred_at=event["occurred_at"],
    )
    # Money stays an exact string on the wire.
    assert body["event"]["fields"]["customer_charge_usd"] == "0.0054"


async def test_an_amend_starts_from_the_current_effective_values(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    earlier = replace(
        as_stored(event),
        deployment_id="dep-7",
        customer_charge_usd=Decimal("0.0100"),
        customer_charge_cents=1,
    )
    await set_effective(pool, event, earlier, winner="c-earlier")
    async with api_client(pool, settings=topics.settings) as (client, _):
        answer = await client.post(
            _corrections(event["gateway_request_id"]),
            json={
                "action": "amend",
                "fields": {"customer_charge_usd": "0.0042", "output_tokens": 10},
                "reason": "repriced",
                "tenant_id": tenant,
            },
            headers=admin_header(),
        )
    assert answer.status_code == 202, answer.text
    [record] = await _published(topics)
    fields = json.loads(record.value)["fields"]
    # The earlier correction's deployment stays; the new charge has no gateway cents.
    assert fields == {
        "deployment_id": "dep-7",
        "user_id": "user-1",
        "agent_id": None,
        "input_tokens": 1200,
        "output_tokens": 10,
        "cached_input_tokens": 0,
        "reasoning_tokens": 0,
        "total_tokens": 1210,
        "customer_charge_usd": "0.0042",
    }


async def test_a_void_with_its_own_id_and_time_is_published_as_sent_and_repeats_unchanged(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    decided = clock.now() - timedelta(minutes=5)
    body = {
        "action": "void",
        "fields": {},
        "reason": "test traffic",
        "correction_id": "c-void-1",
        "occurred_at": utc_text(decided),
    }
    async with api_client(pool, settings=topics.settings) as (client, _):
        answers = [
            await client.post(
                _corrections(event["gateway_request_id"]), json=body, headers=admin_header()
            )
            for _ in range(2)
        ]
    assert [answer.status_code for answer in answers] == [202, 202]
    assert answers[0].json() == answers[1].json()
    first, second = await _published(topics, expected=2)
    assert first.value == second.value
    decoded = decode_usage_topic_record(first.value, now=clock.now())
    assert isinstance(decoded, Correction)
    assert (decoded.correction_id, decoded.action, decoded.fields) == ("c-void-1", "void", {})
    assert decoded.occurred_at == decided
    assert "fields" not in json.loads(first.value)


async def test_the_event_shows_its_effective_values_and_history_oldest_first(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    start = clock.now() - timedelta(hours=1)
    await add_correction(
        pool, event, "c-b", action="amend", occurred_at=start + timedelta(minutes=2),
        fields={"user_id": "user-9", "customer_charge_usd": "0.0100"},
    )  # fmt: skip
    await add_correction(pool, event, "c-a", action="void", occurred_at=start)
    await add_correction(
        pool, event, "c-c", action="void", occurred_at=start + timedelta(minutes=1), won=False
    )
    moved = replace(
        as_stored(event),
        user_id="user-9",
        customer_charge_usd=Decimal("0.0100"),
        customer_charge_cents=None,
    )
    await set_effective(pool, event, moved, winner="c-b")
    url = f"/v1/usage-events/{event['gateway_request_id']}"
    member = bearer(token("tenant-member", tenant))
    async with api_client(pool) as (client, _):
        answer = await client.get(url, headers=member)
        assert answer.status_code == 200, answer.text
        shown = answer.json()
        assert shown["event"]["user_id"] == "user-1"
        assert shown["event"]["customer_charge_usd"] == "0.0054"
        assert shown["effective"] == {
            "deployment_id": "dep-1",
            "user_id": "user-9",
            "agent_id": None,
            "input_tokens": 1200,
            "output_tokens": 300,
            "cached_input_tokens": 0,
            "reasoning_tokens": 0,
            "total_tokens": 1500,
            "customer_charge_usd": "0.01",
            "customer_charge_cents": None,
            "charge_estimated": False,
            "voided": False,
        }
        assert shown["voided"] is False
        assert shown["waiting"] is False
        assert [c["correction_id"] for c in shown["corrections"]] == ["c-a", "c-c", "c-b"]
        assert shown["corrections"][2] == {
            "correction_id": "c-b",
            "action": "amend",
            "fields": {"user_id": "user-9", "customer_charge_usd": "0.0100"},
            "reason": "reason of c-b",
            "actor": "ops@example.com",
            "occurred_at": utc_text(start + timedelta(minutes=2)),
            "received_at": shown["corrections"][2]["received_at"],
            "verdict": "applied",
            "won": True,
        }
        await park_correction(pool, tenant, event["gateway_request_id"], "c-d")
        assert (await client.get(url, headers=member)).json()["waiting"] is True

        # The events page shows both, and filters on the effective user.
        page = f"/v1/tenants/{tenant}/usage/events"
        [item] = (await client.get(page, headers=member)).json()["items"]
        assert item["user_id"] == "user-1"
        assert item["corrected"] is True
        assert item["effective"] == shown["effective"]
        moved_to = await client.get(page, params={"user_id": "user-9"}, headers=member)
        assert [i["gateway_request_id"] for i in moved_to.json()["items"]] == [
            event["gateway_request_id"]
        ]
        moved_from = await client.get(page, params={"user_id": "user-1"}, headers=member)
        assert moved_from.json()["items"] == []


async def test_a_voided_event_says_so_and_still_shows_its_figures(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    await add_correction(pool, event, "c-void", action="void", occurred_at=clock.now())
    await set_effective(pool, event, replace(as_stored(event), voided=True), winner="c")
    async with api_client(pool) as (client, _):
        shown = (
            await client.get(
                f"/v1/usage-events/{event['gateway_request_id']}", headers=admin_header()
            )
        ).json()
        [item] = (
            await client.get(f"/v1/tenants/{tenant}/usage/events", headers=admin_header())
        ).json()["items"]
    assert shown["voided"] is True
    assert shown["effective"]["voided"] is True
    assert shown["effective"]["customer_charge_usd"] == "0.0054"
    assert item["effective"]["voided"] is True


async def test_an_event_past_the_id_window_is_found_by_its_tenant_with_or_without_a_hint(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    await pool.execute(
        "DELETE FROM usage_event_ids WHERE gateway_request_id = $1", event["gateway_request_id"]
    )
    url = f"/v1/usage-events/{event['gateway_request_id']}"
    async with api_client(pool, settings=topics.settings) as (client, _):
        unnamed = await client.get(url, headers=admin_header())
        assert unnamed.status_code == 422
        for params in (
            {"tenant_id": tenant},
            {"tenant_id": tenant, "event_occurred_at": utc_text(event["occurred_at"])},
            # A wrong hint only costs the slower search.
            {"tenant_id": tenant, "event_occurred_at": utc_text(clock.now() - timedelta(days=3))},
        ):
            answer = await client.get(url, params=params, headers=admin_header())
            assert answer.status_code == 200, (params, answer.text)
        posted = await client.post(
            _corrections(event["gateway_request_id"]),
            json={"action": "void", "reason": "old", "tenant_id": tenant},
            headers=admin_header(),
        )
        assert posted.status_code == 202, posted.text
    [record] = await _published(topics)
    assert json.loads(record.value)["event_occurred_at"] == utc_text(event["occurred_at"])


async def test_an_unreachable_broker_is_a_503_naming_the_correction_id(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1")
    async with api_client(pool, settings=settings) as (client, _):
        answer = await client.post(
            _corrections(event["gateway_request_id"]),
            json={"action": "void", "reason": "x", "correction_id": "c-retry"},
            headers=admin_header(),
        )
    assert answer.status_code == 503
    assert "c-retry" in answer.json()["detail"]


async def test_the_serve_api_process_publishes_a_correction(
    topics: PipelineTopics, pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": topics.settings.kafka_bootstrap_servers,
        "USAGE_TOPIC": topics.usage,
    }
    async with (
        serving(database_url, tmp_path, env=env) as api,
        httpx.AsyncClient(base_url=api.url) as client,
    ):
        answer = await client.post(
            _corrections(event["gateway_request_id"]),
            json={"action": "amend", "fields": {"agent_id": "agent-2"}, "reason": "moved"},
            headers=admin_header(),
        )
        assert answer.status_code == 202, answer.text
        shown = await client.get(
            f"/v1/usage-events/{event['gateway_request_id']}", headers=admin_header()
        )
        assert shown.status_code == 200
    [record] = await _published(topics)
    decoded = decode_usage_topic_record(record.value, now=clock.now())
    assert isinstance(decoded, Correction)
    assert decoded.fields["agent_id"] == "agent-2"
    assert decoded.actor == "ops@example.com"


async def test_the_events_page_shows_what_each_event_counts_for_now(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    kept, moved, voided = [await store_event(pool, tenant) for _ in range(3)]
    await set_effective(
        pool,
        moved,
        replace(as_stored(moved), user_id="user-9", customer_charge_usd=Decimal("0.0100")),
        winner="c-move",
    )
    await set_effective(pool, voided, replace(as_stored(voided), voided=True), winner="c-void")
    async with api_client(pool) as (client, _):
        client.cookies.update({"llm_usage_token": token("tenant-member", tenant)})
        answer = await client.get(f"/ui/tenants/{tenant}/events")
    assert answer.status_code == 200, answer.text
    rows = {
        found["data-id"]: found
        for found in (
            dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', row))
            for row in re.findall(r'<tr class="event"[^>]*>', answer.text)
        )
    }
    assert {name: rows[name]["data-charge"] for name in rows} == {
        kept["gateway_request_id"]: "0.0054",
        moved["gateway_request_id"]: "0.01",
        voided["gateway_request_id"]: "0.0054",
    }
    assert rows[kept["gateway_request_id"]]["data-corrected"] == "false"
    assert rows[moved["gateway_request_id"]]["data-corrected"] == "true"
    assert rows[voided["gateway_request_id"]]["data-voided"] == "true"
    assert rows[moved["gateway_request_id"]]["data-voided"] == "false"
    # The user shown (and linked) is the effective one; what was sent is in the mark.
    assert "user_id=user-9" in answer.text
    assert "corrected; as sent: 0.0054 USD, 1500 tokens, user user-1" in answer.text
    assert ">voided</abbr>" in answer.text
