"""The local launchers behind `llm-usage dev` and the test fixtures, against themselves."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from llm_usage.core.errors import LocalServiceError
from llm_usage.local.kafka import KafkaCluster, ensure_kafka_jars, free_port_block
from llm_usage.local.paths import state_dir
from llm_usage.local.postgres import LocalPostgres
from tests.integration.pipeline import (
    create_pipeline_topics,
    encode,
    produce,
    read_topic,
    spawn_consumer,
    tenant_totals,
    unique,
    usage_event,
    wait_until,
)
from tests.unavailable import service_unavailable


async def create_topic(bootstrap_servers: str, *, partitions: int, replication_factor: int) -> str:
    topic = f"local-services-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, replication_factor)])
    finally:
        await admin.close()
    return topic


async def test_single_broker_creates_a_topic_and_returns_what_was_produced(
    kafka_bootstrap_servers: str,
) -> None:
    topic = await create_topic(kafka_bootstrap_servers, partitions=2, replication_factor=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap_servers, enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, key=b"tenant-1", value=b"hello")
    finally:
        await producer.stop()

    [record] = await read_topic(kafka_bootstrap_servers, topic, expected=1)

    assert (record.key, record.value) == (b"tenant-1", b"hello")


@pytest.fixture
async def three_brokers(tmp_path: Path) -> AsyncIterator[KafkaCluster]:
    try:
        libs = await asyncio.to_thread(ensure_kafka_jars)
    except LocalServiceError as error:
        service_unavailable(f"cannot run a local Kafka cluster: {error}")
    cluster = KafkaCluster(
        state_dir=tmp_path / "kafka", nodes=3, port=free_port_block(6), heap_mb=384, libs=libs
    )
    try:
        await asyncio.to_thread(cluster.start)
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_three_brokers_keep_accepting_idempotent_writes_after_one_is_killed(
    three_brokers: KafkaCluster,
) -> None:
    servers = three_brokers.bootstrap_servers
    topic = await create_topic(servers, partitions=3, replication_factor=3)
    producer = AIOKafkaProducer(
        bootstrap_servers=servers, enable_idempotence=True, request_timeout_ms=30_000
    )
    await producer.start()
    try:
        before = [await producer.send(topic, value=f"before-{i}".encode()) for i in range(60)]
        await asyncio.gather(*before)
        # Kill the leader of partition 0, so at least one partition has to move.
        leader = producer.client.cluster.leader_for_partition(TopicPartition(topic, 0))
        assert isinstance(leader, int)
        await asyncio.to_thread(three_brokers.kill_node, leader - 1)
        assert not await asyncio.to_thread(three_brokers.is_running)

        after = [await producer.send(topic, value=f"after-{i}".encode()) for i in range(60)]
        await asyncio.wait_for(asyncio.gather(*after), timeout=60)
    finally:
        await producer.stop()

    survivors = ",".join(address for i, address in enumerate(servers.split(",")) if i != leader - 1)
    records = await read_topic(survivors, topic, expected=120)
    assert sorted(r.value for r in records) == sorted(
        [f"before-{i}".encode() for i in range(60)] + [f"after-{i}".encode() for i in range(60)]
    )

    await asyncio.to_thread(three_brokers.start_node, leader - 1)
    assert await asyncio.to_thread(three_brokers.is_running)


@pytest.fixture
def scratch_postgres() -> Iterator[LocalPostgres]:
    """A PostgreSQL of this test's own, so restarting it disturbs no other test."""
    home = Path(tempfile.mkdtemp(prefix="pytest-restart-", dir=state_dir()))
    server = LocalPostgres(data_dir=home / "data", database="restart_check")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


async def test_local_postgres_restart_keeps_the_dsn_and_answers_after(
    scratch_postgres: LocalPostgres,
) -> None:
    dsn = await asyncio.to_thread(scratch_postgres.start)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (42)")
    finally:
        await connection.close()

    await asyncio.to_thread(scratch_postgres.restart)

    assert scratch_postgres.dsn == dsn
    connection = await asyncpg.connect(dsn)
    try:
        assert await connection.fetchval("SELECT n FROM kept") == 42
    finally:
        await connection.close()


async def test_a_dead_broker_is_a_few_log_lines_not_a_storm(
    three_brokers: KafkaCluster, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=three_brokers.bootstrap_servers,
        database_url=database_url,
        partitions=3,
        replication_factor=3,
    )
    tenant = unique("tenant")
    servers = three_brokers.bootstrap_servers
    await produce(servers, topics.usage, [(None, encode(usage_event(tenant))) for _ in range(50)])
    consumer = await spawn_consumer(topics, env={**topics.environment(), "LOG_LEVEL": "INFO"})
    try:

        async def first_stored() -> bool:
            return (await tenant_totals(pool, tenant))[0] == 50

        await wait_until(first_stored, within=60, message="nothing stored before the outage")
        await asyncio.to_thread(three_brokers.kill_node, 2)
        survivors = ",".join(servers.split(",")[:2])
        for _ in range(10):  # 20 s of outage, with traffic
            batch = [(None, encode(usage_event(tenant))) for _ in range(5)]
            await produce(survivors, topics.usage, batch)
            await asyncio.sleep(2)

        async def all_stored() -> bool:
            return (await tenant_totals(pool, tenant))[0] == 100

        await wait_until(all_stored, within=60, message="the outage stopped the consumer")
    finally:
        consumer.process.send_signal(signal.SIGTERM)
        await consumer.finished(within=60)
        print(consumer.log_tail())  # noqa: T201 - shown when the test fails
    library_lines = [
        line
        for line in consumer.lines
        if line.startswith("{") and json.loads(line).get("logger", "").startswith("aiokafka")
    ]
    # aiokafka alone logs an error every ~100 ms per connection while a broker is down: about
    # 200 lines here. Each distinct error is its first line, a summary a minute, an end line.
    assert len(library_lines) <= 12, "\n".join(library_lines)
