"""Gateways that publish through librdkafka (confluent_kafka here): every codec, transactions.

The usage consumer is aiokafka; these tests hold it to what a librdkafka producer really writes:
compressed multi-record batches, idempotent sequences, null keys, headers, and transaction
markers, including aborted transactions and transactions still open while the consumer reads.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import signal
from collections.abc import Iterator, Sequence

import asyncpg
import pytest

from tests.integration.interop import (
    Event,
    Headers,
    RdkafkaProducer,
    assert_none_stored,
    assert_stored_exactly_once,
    consume_until_idle,
    dead_letter_ends,
    end_offsets,
    exact_charge,
)
from tests.integration.pipeline import (
    PipelineTopics,
    create_pipeline_topics,
    encode,
    read_topic,
    spawn_consumer,
    stored_for,
    unique,
    usage_event,
    wait_until,
)

PARTITIONS = 3
CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


@pytest.fixture
async def topics(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> PipelineTopics:
    return await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers,
        database_url=database_url,
        partitions=PARTITIONS,
    )


def headers(sequence: int) -> Headers:
    # A gateway's tracing headers, one of them with a null value: the consumer ignores them all.
    return [
        ("source", b"librdkafka-interop"),
        ("trace-id", None),
        ("sequence", str(sequence).encode()),
    ]


def publish(producer: RdkafkaProducer, topic: str, events: Sequence[Event]) -> None:
    """Queue `events`: every fifth one with a null key (the partitioner picks its partition),
    the others keyed by tenant and spread over every partition."""
    for sequence, event in enumerate(events):
        null_key = sequence % 5 == 0
        producer.send(
            topic,
            encode(event),
            key=None if null_key else event["tenant_id"].encode(),
            partition=None if null_key else sequence % PARTITIONS,
            headers=headers(sequence),
        )


def charges() -> Iterator[str]:
    return (exact_charge(i) for i in itertools.count(1))


@pytest.mark.parametrize("codec", CODECS)
async def test_idempotent_batches_of_each_codec_are_stored_exactly_once(
    codec: str, topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    bootstrap = topics.settings.kafka_bootstrap_servers
    tenants = [unique("tenant") for _ in range(4)]
    charge = charges()
    events = [usage_event(tenants[i % 4], customer_charge_usd=next(charge)) for i in range(600)]
    producer = RdkafkaProducer(
        bootstrap,
        {"compression.type": codec, "linger.ms": 100, "batch.num.messages": 10_000},
    )
    publish(producer, topics.usage, events)
    producer.flush()

    # The codec was really applied to real batches, on every partition.
    stats = producer.statistics(transmitted=len(events))
    payload = sum(len(encode(event)) for event in events)
    assert set(producer.partitions) == set(range(PARTITIONS)), producer.partitions
    assert stats["tx"] < len(events) / 20, f"{stats['tx']} requests: records were not batched"
    if codec == "none":
        assert stats["tx_bytes"] > payload
    else:
        assert stats["tx_bytes"] < payload / 2, (stats["tx_bytes"], payload)

    dead_before = await dead_letter_ends(topics)
    stopped = await consume_until_idle(topics)
    assert stopped.get("recorded") == len(events), stopped
    assert not {"dead_lettered", "conflict", "duplicate"} & set(stopped), stopped
    await assert_stored_exactly_once(pool, events)
    assert await dead_letter_ends(topics) == dead_before


async def test_committed_transactions_are_stored_and_aborted_ones_never(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    bootstrap = topics.settings.kafka_bootstrap_servers
    tenants = [unique("tenant") for _ in range(3)]
    charge = charges()

    def new_events(count: int) -> list[Event]:
        return [usage_event(tenants[i % 3], customer_charge_usd=next(charge)) for i in range(count)]

    gateway = RdkafkaProducer(
        bootstrap,
        {"transactional.id": unique("gateway"), "compression.type": "lz4", "linger.ms": 20},
    )
    plain = RdkafkaProducer(bootstrap, {"compression.type": "zstd", "linger.ms": 5})
    gateway.client.init_transactions(30)
    committed: list[Event] = []
    aborted: list[Event] = []
    outside: list[Event] = []
    for round_number in range(6):
        batch = new_events(40)
        if aborted:
            # The gateway retries some of an aborted transaction's events with the same ids and a
            # corrected charge: only the committed copy exists, so it is no conflict.
            batch += [
                usage_event(e["tenant_id"], gateway_request_id=e["gateway_request_id"])
                | {"customer_charge_usd": "0.25", "customer_charge_cents": 25}
                for e in aborted[-40:-30]
            ]
        gateway.client.begin_transaction()
        publish(gateway, topics.usage, batch)
        # Another (non-transactional) producer writes to the same partitions meanwhile.
        extra = new_events(10)
        publish(plain, topics.usage, extra)
        plain.flush()
        outside += extra
        gateway.flush()  # on the broker before the decision, so an abort has something to hide
        # Even rounds commit, odd ones abort; the last (5) is aborted, so the topic ends in
        # abort markers that the consumer must step over to be idle.
        if round_number % 2 == 0:
            gateway.client.commit_transaction(30)
            committed += batch
        else:
            gateway.client.abort_transaction(30)
            aborted += batch
    retried = {e["gateway_request_id"] for e in committed}
    never = [e for e in aborted if e["gateway_request_id"] not in retried]
    assert len(never) < len(aborted), "no aborted event was retried"

    # The aborted records are in the log: a read_uncommitted reader (aiokafka's default) sees them.
    everything = len(committed) + len(aborted) + len(outside)
    in_log = await read_topic(bootstrap, topics.usage, expected=everything, within=60)
    assert len(in_log) == everything

    dead_before = await dead_letter_ends(topics)
    stopped = await consume_until_idle(topics)
    assert stopped.get("recorded") == len(committed) + len(outside), stopped
    assert not {"dead_lettered", "conflict"} & set(stopped), stopped
    # Per tenant totals hold only committed and outside events: the aborted share those tenants.
    await assert_stored_exactly_once(pool, committed + outside)
    await assert_none_stored(pool, never)
    assert await dead_letter_ends(topics) == dead_before


async def test_an_open_transaction_is_stored_only_once_committed(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    """The consumer already runs while a gateway's transaction is open, then committed, and
    another is aborted. Absence is proved by offsets: later records of other partitions, or of
    the same partition, are stored while the transaction's records are not."""
    bootstrap = topics.settings.kafka_bootstrap_servers
    tenant = unique("tenant")
    charge = charges()

    def new_events(count: int) -> list[Event]:
        return [usage_event(tenant, customer_charge_usd=next(charge)) for _ in range(count)]

    def send_to(producer: RdkafkaProducer, partition: int, events: Sequence[Event]) -> None:
        for sequence, event in enumerate(events):
            producer.send(
                topics.usage,
                encode(event),
                key=tenant.encode(),
                partition=partition,
                headers=headers(sequence),
            )
        producer.flush()

    async def all_stored(events: Sequence[Event]) -> bool:
        ids = [e["gateway_request_id"] for e in events]
        return len(await stored_for(pool, ids)) == len(ids)

    gateway = RdkafkaProducer(
        bootstrap, {"transactional.id": unique("gateway"), "compression.type": "zstd"}
    )
    plain = RdkafkaProducer(bootstrap, {"compression.type": "snappy"})
    dead_before = await dead_letter_ends(topics)
    consumer = await spawn_consumer(topics)
    stored_later: list[Event] = []
    try:

        async def holds_every_partition() -> bool:
            assigned = consumer.logged("Partitions assigned.")
            return bool(assigned) and len(assigned[-1]["partitions"]) == PARTITIONS

        await wait_until(holds_every_partition, within=60, message="the consumer got no partitions")
        await asyncio.to_thread(gateway.client.init_transactions, 30)
        await asyncio.to_thread(gateway.client.begin_transaction)
        pending = new_events(30)
        await asyncio.to_thread(send_to, gateway, 0, pending)
        # Behind the open transaction on its partition: past the last stable offset, so hidden
        # until the transaction ends, although it is itself committed.
        behind = new_events(1)
        await asyncio.to_thread(send_to, plain, 0, behind)
        ends = await asyncio.to_thread(end_offsets, bootstrap, topics.usage)
        assert ends[0] == len(pending) + len(behind), ends
        stable = await asyncio.to_thread(end_offsets, bootstrap, topics.usage, stable=True)
        assert stable[0] == 0, f"the broker does not see the transaction as open: {stable}"
        # Two rounds on the other partitions, each produced after the one before was stored: the
        # consumer fetched partition 0 with them and has landed whatever those fetches returned.
        for _ in range(2):
            beside = new_events(4)
            await asyncio.to_thread(send_to, plain, 1, beside[:2])
            await asyncio.to_thread(send_to, plain, 2, beside[2:])
            stored_later += beside
            await wait_until(
                functools.partial(all_stored, beside), within=60, message="the consumer stalled"
            )
        await assert_none_stored(pool, pending + behind)

        await asyncio.to_thread(gateway.client.commit_transaction, 30)
        stored_later += pending + behind
        await wait_until(
            lambda: all_stored(pending + behind),
            within=60,
            message="the committed transaction was not stored",
        )

        # A transaction aborted while the consumer runs; events after its abort marker on the
        # same partitions are stored, so the consumer has read past it.
        await asyncio.to_thread(gateway.client.begin_transaction)
        doomed = new_events(20)
        await asyncio.to_thread(send_to, gateway, 0, doomed[:10])
        await asyncio.to_thread(send_to, gateway, 1, doomed[10:])
        await asyncio.to_thread(gateway.client.abort_transaction, 30)
        after = new_events(4)
        await asyncio.to_thread(send_to, plain, 0, after[:2])
        await asyncio.to_thread(send_to, plain, 1, after[2:])
        stored_later += after
        await wait_until(
            lambda: all_stored(after), within=60, message="nothing after the abort was stored"
        )
        await assert_none_stored(pool, doomed)
    finally:
        if consumer.process.returncode is None:
            consumer.process.send_signal(signal.SIGTERM)
        code = await consumer.finished(within=60)
    assert code == 0, consumer.log_tail()
    await assert_stored_exactly_once(pool, stored_later)
    assert await dead_letter_ends(topics) == dead_before
