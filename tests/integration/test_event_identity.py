"""The two-tier identity end to end, with both consumers as real processes on a real Kafka and
PostgreSQL: expired months, identical re-sends after the window, and conflicting copies in two
months that the usage and the budget consumer must settle the same way."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from llm_usage.domain.periods import add_months
from llm_usage.storage.partitions import attached_months
from tests import clock
from tests.integration.pipeline import (
    PipelineTopics,
    create_pipeline_topics,
    encode,
    header,
    produce,
    read_topic,
    spawn_consumer,
    stored_for,
    topic_record_count,
    unique,
    usage_event,
)


async def drain(topics: PipelineTopics, *workers: str) -> dict[str, dict[str, Any]]:
    """Run each worker over everything published so far, one after the other; return the
    counts each logged when it stopped."""
    stopped = {}
    for worker in workers:
        consumer = await spawn_consumer(topics, "--exit-when-idle", "3", worker=worker)
        assert await consumer.finished(within=120) == 0, consumer.log_tail()
        stopped[worker] = consumer.logged("Consumer stopped.")[-1]
    return stopped


async def publish(topics: PipelineTopics, *values: bytes) -> None:
    """Publish to the usage topic, keyed as gateways key (one key: one partition, in order)."""
    bootstrap = topics.settings.kafka_bootstrap_servers
    await produce(bootstrap, topics.usage, [(b"tenant", value) for value in values])


async def tenant_spend(pool: asyncpg.Pool, tenant_id: str) -> dict[str, Decimal]:
    """The tenant's monthly spend counters, by month."""
    rows = await pool.fetch(
        "SELECT period_start, spend_usd FROM budget_spend WHERE tenant_id = $1 "
        "AND scope_type = 'tenant' AND \"window\" = 'monthly'",
        tenant_id,
    )
    return {f"{row['period_start']:%Y-%m}": row["spend_usd"] for row in rows}


async def test_an_event_of_a_month_past_retention_is_dead_lettered_expired_and_not_counted(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=1
    )
    async with pool.acquire() as connection:
        floor = (await attached_months(connection)).oldest
    assert floor is not None, "a new database has monthly partitions"
    assert floor > date.min, "a new database has no legacy partition"
    tenant = unique("tenant")
    before_floor = datetime.combine(floor, time(), tzinfo=UTC) - timedelta(microseconds=1)
    expired = usage_event(tenant, occurred_at=before_floor.isoformat())
    kept = usage_event(tenant, occurred_at=datetime.combine(floor, time(), tzinfo=UTC).isoformat())
    await publish(topics, encode(expired), encode(kept))

    stopped = await drain(topics, "usage", "budget")

    assert [
        r["gateway_request_id"]
        for r in await stored_for(pool, [expired["gateway_request_id"], kept["gateway_request_id"]])
    ] == [kept["gateway_request_id"]]
    [dead] = await read_topic(kafka_bootstrap_servers, topics.dlq, expected=1)
    assert header(dead, "dlq.reason") == "expired"
    assert f"{floor}" in header(dead, "dlq.detail")
    assert stopped["usage"].get("recorded") == 1, stopped
    # The budget consumer counts the kept one only (its month is past the budget horizon, so it
    # adds to no counter: the window says it was counted all the same).
    counted = await pool.fetch(
        "SELECT gateway_request_id FROM usage_event_ids WHERE counted AND tenant_id = $1", tenant
    )
    assert [r[0] for r in counted] == [kept["gateway_request_id"]]
    assert await tenant_spend(pool, tenant) == {}


async def test_an_identical_resend_after_the_window_is_stored_and_counted_once(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=1
    )
    tenant, other_tenant = unique("tenant"), unique("tenant")
    event = usage_event(tenant)
    await publish(topics, encode(event))
    await drain(topics, "usage", "budget")
    # The window forgets the id, as `llm-usage maintain` does once it is older than the window.
    await pool.execute(
        "DELETE FROM usage_event_ids WHERE gateway_request_id = $1", event["gateway_request_id"]
    )

    other_charge = {**event, "customer_charge_usd": "0.0099", "customer_charge_cents": 1}
    re_used = {**event, "tenant_id": other_tenant}  # another event re-using the old id
    await publish(topics, encode(event), encode(other_charge), encode(event))
    stopped = await drain(topics, "usage", "budget")
    assert stopped["usage"].get("recorded", 0) == 0, stopped
    assert stopped["usage"].get("duplicate") == 2, stopped
    assert stopped["usage"].get("conflict") == 1, stopped
    # The contract's one limit: past the window, a different event re-using the id is new.
    await publish(topics, encode(re_used))
    stopped = await drain(topics, "usage", "budget")
    assert stopped["usage"].get("recorded") == 1, stopped

    rows = await stored_for(pool, [event["gateway_request_id"]])
    assert sorted(r["tenant_id"] for r in rows) == sorted([tenant, other_tenant])
    [dead] = await read_topic(kafka_bootstrap_servers, topics.dlq, expected=1)
    assert header(dead, "dlq.reason") == "conflicting_duplicate"
    assert dead.value == encode(other_charge)
    # Counted once for the first tenant, and the re-used id once for the other: what is stored.
    month = f"{clock.this_month():%Y-%m}"
    assert await tenant_spend(pool, tenant) == {month: Decimal("0.0054")}
    assert await tenant_spend(pool, other_tenant) == {month: Decimal("0.0054")}


async def test_conflicting_copies_in_two_months_are_settled_alike_by_both_consumers(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    # The budget consumer sees copy B first; the usage consumer may see A (another partition,
    # the month before) first. Both follow the first copy the shared window holds: B.
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=1
    )
    tenant = unique("tenant")
    this_month = clock.this_month()
    last_month = add_months(this_month, -1)
    copy_b = usage_event(tenant, customer_charge_usd="0.0099", customer_charge_cents=1)
    copy_a = {
        **copy_b,
        "customer_charge_usd": "0.0054",
        "customer_charge_cents": 1,
        "occurred_at": datetime.combine(last_month, time(12), tzinfo=UTC).isoformat(),
    }
    await publish(topics, encode(copy_b))
    await drain(topics, "budget")
    await publish(topics, encode(copy_a))
    stopped = await drain(topics, "usage", "budget")

    [row] = await stored_for(pool, [copy_b["gateway_request_id"]])
    assert row["customer_charge_usd"] == Decimal("0.0099")
    assert row["occurred_at"] == datetime.fromisoformat(copy_b["occurred_at"])
    assert stopped["usage"].get("conflict") == 1, stopped
    assert await topic_record_count(kafka_bootstrap_servers, topics.dlq) == 1
    assert await tenant_spend(pool, tenant) == {f"{this_month:%Y-%m}": Decimal("0.0099")}
