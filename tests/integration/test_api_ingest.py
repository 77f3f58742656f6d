"""`POST /v1/usage-events` against a real broker: what it accepts is on the usage topic before
the answer, and the real usage consumer stores it exactly once."""

from __future__ import annotations

import json
from decimal import Decimal

import asyncpg

from tests.api_support import api_client, bearer, token
from tests.integration.pipeline import (
    PipelineTopics,
    read_topic,
    spawn_consumer,
    stored_for,
    topic_record_count,
    unique,
    usage_event,
)


async def test_posted_events_are_published_then_stored_by_the_usage_consumer(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    valid = [usage_event(tenant, customer_charge_usd=f"0.00{n}1") for n in range(5)]
    repeated = valid[0]
    broken = usage_event(tenant, input_tokens=-1)
    # A JSON number for the charge, read from its literal digits all the way to the database.
    literal = usage_event(tenant, customer_charge_cents=None)
    literal_text = json.dumps({**literal, "customer_charge_usd": "@"}).replace(
        '"@"', "0.12345678901234567890"[:20]
    )
    body = (
        "["
        + ",".join(
            [json.dumps(e) for e in valid]
            + [json.dumps(broken), json.dumps(repeated), literal_text, '"not an object"']
        )
        + "]"
    )
    async with api_client(pool, settings=topics.settings) as (client, context):
        answer = await client.post(
            "/v1/usage-events", content=body, headers=bearer(token("platform-admin"))
        )
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        # On the topic before the answer: read without waiting for anything else.
        assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.usage) == 7
        metrics = context.metrics.registry
        assert (
            metrics.get_sample_value("llm_usage_api_ingested_events_total", {"result": "accepted"})
            == 7
        )
    assert [r["status"] for r in results] == ["accepted"] * 5 + [
        "rejected",
        "accepted",
        "accepted",
        "rejected",
    ]
    assert [r["gateway_request_id"] for r in results[:7]] == [
        *(e["gateway_request_id"] for e in valid),
        broken["gateway_request_id"],
        repeated["gateway_request_id"],
    ]
    assert results[5]["reason"] == "schema_violation"
    assert "input_tokens" in results[5]["detail"]
    assert results[8] == {
        "gateway_request_id": None,
        "status": "rejected",
        "reason": "schema_violation",
        "detail": "the JSON value is a string; a usage event is a JSON object",
    }
    records = await read_topic(topics.settings.kafka_bootstrap_servers, topics.usage, expected=7)
    assert {record.key for record in records} == {tenant.encode()}

    consumer = await spawn_consumer(topics, "--exit-when-idle", "2")
    assert await consumer.finished(within=90) == 0, consumer.log_tail()
    ids = [e["gateway_request_id"] for e in [*valid, literal, broken]]
    stored = {row["gateway_request_id"]: row for row in await stored_for(pool, ids)}
    assert set(stored) == {e["gateway_request_id"] for e in [*valid, literal]}
    assert stored[literal["gateway_request_id"]]["customer_charge_usd"] == Decimal(
        "0.123456789012345678"
    )
    # Nothing it was sent needed the DLQ: the API had already turned away what is invalid.
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.dlq) == 0


async def test_one_event_alone_and_a_known_id_again_are_accepted(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    event = usage_event(unique("tenant"))
    async with api_client(pool, settings=topics.settings) as (client, _):
        for _ in range(2):
            answer = await client.post(
                "/v1/usage-events", json=event, headers=bearer(token("platform-admin"))
            )
            assert answer.json() == {
                "results": [
                    {
                        "gateway_request_id": event["gateway_request_id"],
                        "status": "accepted",
                        "reason": None,
                        "detail": None,
                    }
                ]
            }
    consumer = await spawn_consumer(topics, "--exit-when-idle", "2")
    assert await consumer.finished(within=90) == 0, consumer.log_tail()
    assert len(await stored_for(pool, [event["gateway_request_id"]])) == 1


async def test_an_unreachable_broker_accepts_nothing(pool: asyncpg.Pool) -> None:
    from llm_usage.core.settings import Settings  # noqa: PLC0415

    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1")
    async with api_client(pool, settings=settings) as (client, _):
        answer = await client.post(
            "/v1/usage-events",
            json=[usage_event(unique("tenant"))],
            headers=bearer(token("platform-admin")),
        )
    assert answer.status_code == 503
    assert "send them all again" in answer.json()["detail"]
