"""`llm-usage dlq replay` re-drives dead letters after a fix, and only the ones chosen."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from tests.integration.pipeline import (
    PipelineTopics,
    create_pipeline_topics,
    encode,
    produce,
    spawn_consumer,
    stored_for,
    topic_record_count,
    unique,
    usage_event,
)


async def replay(topics: PipelineTopics, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "llm_usage", "dlq", "replay", *args),
        env={**os.environ, **topics.environment()},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def drain(topics: PipelineTopics) -> None:
    consumer = await spawn_consumer(topics, "--exit-when-idle", "2")
    assert await consumer.finished(within=120) == 0, consumer.log_tail()


async def test_rows_the_database_refused_are_stored_once_replayed_after_the_fix(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=1
    )
    tenant = unique("tenant")
    # A bug of ours: a constraint that refuses one valid charge, among rows that land.
    constraint = unique("it_refuse_one").replace("-", "_")
    await pool.execute(
        f"ALTER TABLE llm_usage_events ADD CONSTRAINT {constraint} "
        f"CHECK (tenant_id <> '{tenant}' OR customer_charge_usd <> 0.4242) NOT VALID"
    )
    try:
        good = [usage_event(tenant) for _ in range(8)]
        refused = usage_event(tenant, customer_charge_usd="0.4242")
        malformed = b'{"tenant_id": "broken"'
        values = [encode(e) for e in good[:4]] + [encode(refused), malformed]
        values += [encode(e) for e in good[4:]]
        await produce(kafka_bootstrap_servers, topics.usage, [(b"k", v) for v in values])
        await drain(topics)
    finally:
        await pool.execute(f"ALTER TABLE llm_usage_events DROP CONSTRAINT IF EXISTS {constraint}")
    assert await stored_for(pool, [refused["gateway_request_id"]]) == []
    assert await topic_record_count(kafka_bootstrap_servers, topics.dlq) == 2

    code, out, _ = await replay(
        topics, "--partition", "0", "--detail-contains", "rejected by the database", "--dry-run"
    )
    assert code == 0
    assert "1 of 2 dead letters would be replayed" in out
    assert await topic_record_count(kafka_bootstrap_servers, topics.usage) == len(values)

    code, out, _ = await replay(
        topics, "--partition", "0", "--reason", "schema_violation", "--detail-contains", "database"
    )
    assert code == 0, out
    assert "1 of 2 dead letters replayed" in out
    await drain(topics)
    [row] = await stored_for(pool, [refused["gateway_request_id"]])
    assert str(row["customer_charge_usd"]) == "0.4242"
    # The malformed record was not chosen: nothing new in the DLQ, nothing else republished.
    assert await topic_record_count(kafka_bootstrap_servers, topics.usage) == len(values) + 1
    assert await topic_record_count(kafka_bootstrap_servers, topics.dlq) == 2

    # Replaying it again is harmless: the id is stored once.
    code, _, _ = await replay(topics, "--partition", "0", "--detail-contains", "database")
    assert code == 0
    await drain(topics)
    assert len(await stored_for(pool, [refused["gateway_request_id"]])) == 1


async def test_an_unknown_partition_is_one_line(
    kafka_bootstrap_servers: str, database_url: str
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=1
    )
    code, _, err = await replay(topics, "--partition", "7")
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "--partition 7" in err
