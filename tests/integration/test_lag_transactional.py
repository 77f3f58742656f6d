"""The lag gauge reaches 0 after a transactional gateway's last write.

Under read_committed a transaction ends in a commit marker: an offset in the log that is never
delivered. Measured against the high watermark from `last record + 1`, a partition whose last
write was a transaction shows lag 1 forever, and `LLMUsageConsumerNoProgress` pages whenever such
a gateway goes quiet. Real transactional producers (librdkafka and aiokafka) write to the real
broker; a real `consume usage` process stores the events; its /metrics must read lag 0 on every
partition, and the group's committed offsets must reach the end of the log (what KEDA and
`kafka-consumer-groups` measure).
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from llm_usage.testing.processes import free_port
from tests.integration.interop import Event, RdkafkaProducer, end_offsets
from tests.integration.pipeline import (
    PipelineTopics,
    committed_offsets,
    create_pipeline_topics,
    encode,
    spawn_consumer,
    stored_for,
    unique,
    usage_event,
    wait_until,
)

PARTITIONS = 2
Publish = Callable[[PipelineTopics, Sequence[Event]], Coroutine[Any, Any, None]]


async def publish_with_librdkafka(topics: PipelineTopics, events: Sequence[Event]) -> None:
    gateway = RdkafkaProducer(
        topics.settings.kafka_bootstrap_servers,
        {"transactional.id": unique("gateway"), "linger.ms": 5},
    )

    def transaction() -> None:
        gateway.client.init_transactions(30)
        gateway.client.begin_transaction()
        for index, event in enumerate(events):
            gateway.send(
                topics.usage,
                encode(event),
                key=event["tenant_id"].encode(),
                partition=index % PARTITIONS,
            )
        gateway.flush()
        gateway.client.commit_transaction(30)

    await asyncio.to_thread(transaction)


async def publish_with_aiokafka(topics: PipelineTopics, events: Sequence[Event]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=topics.settings.kafka_bootstrap_servers,
        transactional_id=unique("gateway"),
        enable_idempotence=True,
    )
    await producer.start()
    try:
        async with producer.transaction():
            for index, event in enumerate(events):
                await producer.send(
                    topics.usage,
                    encode(event),
                    key=event["tenant_id"].encode(),
                    partition=index % PARTITIONS,
                )
    finally:
        await producer.stop()


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())
    except (urllib.error.URLError, OSError):
        return None


async def lag_by_partition(port: int, topic: str) -> dict[int, float]:
    text = await asyncio.to_thread(scrape, port)
    return {
        int(sample.labels["partition"]): sample.value
        for family in text_string_to_metric_families(text or "")
        for sample in family.samples
        if sample.name == "llm_usage_consumer_lag" and sample.labels.get("topic") == topic
    }


@pytest.mark.parametrize(
    "publish",
    [publish_with_librdkafka, publish_with_aiokafka],
    ids=["librdkafka", "aiokafka"],
)
async def test_lag_reads_zero_after_a_transactions_commit_marker(
    publish: Publish, kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers,
        database_url=database_url,
        partitions=PARTITIONS,
    )
    port = free_port()
    consumer = await spawn_consumer(topics, env={**topics.environment(), "METRICS_PORT": str(port)})
    tenant = unique("tenant")
    events = [usage_event(tenant, customer_charge_usd="0.0125") for _ in range(40)]
    await publish(topics, events)
    bootstrap = topics.settings.kafka_bootstrap_servers

    # The log ends in a commit marker on every partition: one offset past the last record (the
    # coordinator writes the markers just after the commit returns).
    marked = {p: len(events) // PARTITIONS + 1 for p in range(PARTITIONS)}

    async def markers_written() -> bool:
        return await asyncio.to_thread(end_offsets, bootstrap, topics.usage) == marked

    await wait_until(markers_written, within=20, message="the commit markers were not written")
    ends = marked

    async def stored() -> bool:
        return len(await stored_for(pool, [e["gateway_request_id"] for e in events])) == len(events)

    await wait_until(stored, within=60, message=consumer.log_tail())

    async def lag_is_zero() -> bool:
        lag = await lag_by_partition(port, topics.usage)
        return set(lag) == set(range(PARTITIONS)) and not any(lag.values())

    try:
        await wait_until(lag_is_zero, within=20, message="the lag gauge never read 0")
    except AssertionError as error:
        lag = await lag_by_partition(port, topics.usage)
        raise AssertionError(
            f"{error}: lag {lag}, log ends {ends}\n{consumer.log_tail()}"
        ) from None

    async def committed_to_the_end() -> bool:
        return (
            await committed_offsets(bootstrap, topics.settings.usage_group_id, topics.usage) == ends
        )

    try:
        await wait_until(committed_to_the_end, within=20, message="offsets stop short of the end")
    except AssertionError as error:
        group = topics.settings.usage_group_id
        committed = await committed_offsets(bootstrap, group, topics.usage)
        raise AssertionError(f"{error}: committed {committed}, log ends {ends}") from None
    assert consumer.process.returncode is None, consumer.log_tail()
