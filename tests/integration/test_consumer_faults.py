"""Faults that used to lose or stall usage, reproduced for real: a database that refuses new
rows, a database that is gone or hangs when SIGTERM comes, a rebalance stuck behind a slow member,
and a batch the consumer cannot decode."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

import asyncpg
import confluent_kafka
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from llm_usage.testing.processes import free_port
from tests.integration.pipeline import (
    PipelineTopics,
    RunningConsumer,
    create_pipeline_topics,
    encode,
    produce,
    spawn_consumer,
    stored_for,
    tenant_totals,
    unique,
    usage_event,
    wait_until,
)

# What docs/operations.md promises: SIGTERM to exit, whatever the database or the group is doing.
SHUTDOWN_PROMISE_SECONDS = 30


async def make_topics(
    kafka_bootstrap_servers: str, database_url: str, *, partitions: int
) -> PipelineTopics:
    return await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers,
        database_url=database_url,
        partitions=partitions,
        batch_retry_seconds=2,
    )


async def committed_offsets(topics: PipelineTopics, partitions: int) -> dict[int, int | None]:
    """The consumer group's committed offsets, read without joining the group."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=topics.settings.kafka_bootstrap_servers,
        group_id=topics.settings.usage_group_id,
        enable_auto_commit=False,
    )
    await reader.start()
    try:
        return {
            p: await reader.committed(TopicPartition(topics.usage, p)) for p in range(partitions)
        }
    finally:
        await reader.stop()


async def record_count(bootstrap_servers: str, topic: str, *, partitions: int) -> int:
    """How many records a topic holds (end minus beginning offsets, all partitions)."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    await reader.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await reader.end_offsets(tps)
        starts = await reader.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        await reader.stop()


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def stop_within(consumer: RunningConsumer, seconds: float) -> float:
    """SIGTERM `consumer`; return how long it took to exit (0 exit code asserted)."""
    started = time.monotonic()
    consumer.process.send_signal(signal.SIGTERM)
    code = await consumer.finished(within=seconds)
    assert code == 0, consumer.log_tail()
    return time.monotonic() - started


async def drain(topics: PipelineTopics) -> None:
    consumer = await spawn_consumer(topics, "--exit-when-idle", "2")
    assert await consumer.finished(within=120) == 0, consumer.log_tail()


@pytest.mark.parametrize("max_batch", [1000, 1], ids=["big batches", "one-record batches"])
async def test_a_database_refusing_new_rows_stops_the_consumer_instead_of_dead_lettering(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool, max_batch: int
) -> None:
    topics = await make_topics(kafka_bootstrap_servers, database_url, partitions=1)
    bootstrap = topics.settings.kafka_bootstrap_servers
    tenant = unique("tenant")
    known = [usage_event(tenant) for _ in range(5)]
    await produce(bootstrap, topics.usage, [(None, encode(e)) for e in known])
    await drain(topics)

    # A broken migration: a constraint that refuses every new row of this tenant, while the
    # duplicates of rows already stored still "land" (they are not inserted).
    constraint = unique("it_refuse").replace("-", "_")
    await pool.execute(
        f"ALTER TABLE llm_usage_events ADD CONSTRAINT {constraint} "
        f"CHECK (tenant_id <> '{tenant}') NOT VALID"
    )
    try:
        fresh = [usage_event(tenant, customer_charge_usd=f"0.00{i}7") for i in range(1, 10)]
        mixed = [known[0], known[1], fresh[0], known[2], *fresh[1:5], known[3], *fresh[5:]]
        await produce(bootstrap, topics.usage, [(None, encode(e)) for e in mixed])
        first_new_offset = len(known) + 2  # the offset of fresh[0] on the one partition
        env = {**topics.environment(), "CONSUMER_MAX_BATCH": str(max_batch)}
        consumer = await spawn_consumer(topics, env=env)

        async def given_up_twice() -> bool:
            return len(consumer.logged("Batch did not land; it will be fetched again.")) >= 2

        await wait_until(given_up_twice, within=90, message="the consumer never stopped")
        [refusal, *_] = consumer.logged("Batch did not land; it will be fetched again.")
        assert "DatabaseRefusesRowsError" in refusal["error"], consumer.log_tail()
        dead_lettered = await record_count(bootstrap, topics.dlq, partitions=1)
        assert dead_lettered == 0, "valid usage was dead-lettered"
        committed = (await committed_offsets(topics, 1))[0]
        assert committed is not None
        assert committed <= first_new_offset, "an offset moved past a refused row"
        if max_batch == 1:
            assert committed == first_new_offset, "the duplicates before it should have landed"
        assert await stored_for(pool, [e["gateway_request_id"] for e in fresh]) == []

        # Someone fixes the database: the same consumer carries on by itself.
        await pool.execute(f"ALTER TABLE llm_usage_events DROP CONSTRAINT {constraint}")

        async def all_stored() -> bool:
            return (await tenant_totals(pool, tenant))[0] == len(known) + len(fresh)

        await wait_until(all_stored, within=90, message="the events never landed after the fix")
        await stop_within(consumer, SHUTDOWN_PROMISE_SECONDS)
    finally:
        await pool.execute(f"ALTER TABLE llm_usage_events DROP CONSTRAINT IF EXISTS {constraint}")
    assert await tenant_totals(pool, tenant) == (
        len(known) + len(fresh),
        sum(Decimal(e["customer_charge_usd"]) for e in [*known, *fresh]),
    )
    assert await record_count(bootstrap, topics.dlq, partitions=1) == 0


async def test_sigterm_during_a_database_outage_exits_in_time_and_loses_nothing(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await make_topics(kafka_bootstrap_servers, database_url, partitions=2)
    bootstrap = topics.settings.kafka_bootstrap_servers
    tenant = unique("tenant")
    events = [usage_event(tenant) for _ in range(300)]
    await produce(bootstrap, topics.usage, [(tenant.encode(), encode(e)) for e in events[:100]])
    env = {**topics.environment(), "BATCH_RETRY_SECONDS": "120", "CONSUMER_MAX_BATCH": "50"}
    consumer = await spawn_consumer(topics, env=env)

    async def first_landed() -> bool:
        return (await tenant_totals(pool, tenant))[0] == 100

    await wait_until(first_landed, within=60, message="the consumer stored nothing")
    database = await pool.fetchval("SELECT current_database()")
    # The outage: no new connections, and the consumer's open ones cut. (A database cannot
    # refuse connections from inside itself: the switch is thrown from template1.)
    admin = await asyncpg.connect(database_url, database="template1")
    await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    try:
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'llm-usage' AND datname = current_database()"
        )
        await produce(bootstrap, topics.usage, [(tenant.encode(), encode(e)) for e in events[100:]])

        async def retrying() -> bool:
            return bool(consumer.logged("Retrying after a transient failure."))

        await wait_until(retrying, within=60, message="the consumer never met the outage")
        seconds = await stop_within(consumer, SHUTDOWN_PROMISE_SECONDS)
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    assert seconds < 15, f"SIGTERM took {seconds:.1f} s during the outage"
    await drain(topics)
    assert (await tenant_totals(pool, tenant))[0] == len(events)


async def test_sigterm_during_a_stuck_rebalance_and_a_hanging_batch_exits_in_time(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await make_topics(kafka_bootstrap_servers, database_url, partitions=2)
    bootstrap = topics.settings.kafka_bootstrap_servers
    tenant = unique("tenant")
    events = [usage_event(tenant) for _ in range(200)]
    env = {**topics.environment(), "BATCH_RETRY_SECONDS": "120"}
    first = await spawn_consumer(topics, env=env)

    async def assigned(consumer: RunningConsumer) -> bool:
        return bool(consumer.logged("Partitions assigned."))

    await wait_until(lambda: assigned(first), within=60, message="first member never joined")
    async with pool.acquire() as locker, locker.transaction():
        # Every write of the first member now hangs on this lock: its batch is in flight.
        await locker.execute("LOCK TABLE llm_usage_events IN ACCESS EXCLUSIVE MODE")
        await produce(bootstrap, topics.usage, [(tenant.encode(), encode(e)) for e in events])

        async def hanging() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'llm-usage' "
                    "AND wait_event_type = 'Lock'"
                )
            )

        await wait_until(hanging, within=60, message="the first member's batch never started")
        # A second member joins: the group waits for the first one, whose batch cannot land.
        second = await spawn_consumer(topics, env=env)

        await asyncio.sleep(3)  # the second member is inside its join by now, not yet assigned
        assert not second.logged("Partitions assigned."), "the rebalance was not stuck"
        waited = await stop_within(second, SHUTDOWN_PROMISE_SECONDS)
        assert waited < 15, f"SIGTERM in a stuck join took {waited:.1f} s"
        hung = await stop_within(first, SHUTDOWN_PROMISE_SECONDS)
        assert hung < 20, f"SIGTERM with a hanging batch took {hung:.1f} s"
    await drain(topics)
    assert (await tenant_totals(pool, tenant))[0] == len(events)


async def test_an_undecodable_batch_stops_its_partition_loudly_and_skips_nothing(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap_servers, database_url, partitions=2)
    bootstrap = topics.settings.kafka_bootstrap_servers
    tenant = unique("tenant")
    plain = [usage_event(tenant) for _ in range(50)]
    snappy = [usage_event(tenant) for _ in range(50)]
    # Partition 1: uncompressed. Partition 0: a librdkafka producer's snappy batches.
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "compression.type": "snappy", "linger.ms": 50}
    )
    for event in snappy:
        producer.produce(topics.usage, value=encode(event), partition=0)
    assert producer.flush(30) == 0
    plain_producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap})
    for event in plain:
        plain_producer.produce(topics.usage, value=encode(event), partition=1)
    assert plain_producer.flush(30) == 0

    # A replica whose image lacks the codec library (the bug this project once had).
    shim = tmp_path / "no-codecs"
    shim.mkdir()
    (shim / "cramjam.py").write_text("raise ImportError('cramjam is not installed here')\n")
    port = free_port()
    env = {**topics.environment(), "PYTHONPATH": str(shim), "METRICS_PORT": str(port)}
    crippled = await spawn_consumer(topics, env=env)

    async def stopped_loudly() -> bool:
        return bool(crippled.logged(STOPPED_LINE))

    await wait_until(stopped_loudly, within=60, message="no line about the undecodable batch")
    [line] = crippled.logged(STOPPED_LINE)[:1]
    assert (line["topic"], line["partition"], line["offset"]) == (topics.usage, 0, 0)
    assert "snappy" in line["error"]

    async def plain_stored() -> bool:
        return len(await stored_for(pool, [e["gateway_request_id"] for e in plain])) == 50

    await wait_until(plain_stored, within=60, message="the healthy partition did not move on")
    status, body = http_get(port, "/readyz")
    assert status == 503
    assert f"{topics.usage}[0] stopped at offset 0" in body
    _, metrics = http_get(port, "/metrics")
    assert 'llm_usage_consumer_stopped_partitions{consumer="usage"} 1.0' in metrics
    assert await stored_for(pool, [e["gateway_request_id"] for e in snappy]) == []
    assert (await committed_offsets(topics, 2))[0] in (None, 0), "partition 0 moved on"
    await stop_within(crippled, SHUTDOWN_PROMISE_SECONDS)

    # The fixed image reads everything, once.
    await drain(topics)
    assert await tenant_totals(pool, tenant) == (
        100,
        sum(Decimal(e["customer_charge_usd"]) for e in [*plain, *snappy]),
    )


STOPPED_LINE = (
    "Cannot decode a record batch: this partition is stopped at that offset and nothing after "
    "it is read or skipped until it can be; see docs/operations.md."
)
