"""Helpers for the interop tests: producers that are not aiokafka, and checks on what they sent.

The gateways that publish usage are Go, Elixir, Java and librdkafka programs; these helpers let a
test publish the way they do and then hold the pipeline to exactly what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import asyncpg
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from tests.integration.pipeline import PipelineTopics, spawn_consumer, stored_for, tenant_totals

Event = dict[str, Any]
Headers = list[tuple[str, bytes | None]]


def exact_charge(index: int) -> str:
    """`index / 7` USD with 18 digits after the point: a charge no binary float holds."""
    return str((Decimal(index) / 7).quantize(Decimal("1e-18")))


def exact_sum(amounts: Iterable[Decimal]) -> Decimal:
    """The sum, never rounded: Python's default context keeps 28 digits, and a charge may carry
    30 (12 before the point, 18 after). Any rounding raises instead of passing unnoticed."""
    with decimal.localcontext() as context:
        context.prec = 100
        context.traps[decimal.Inexact] = True
        return sum(amounts, Decimal(0))


def expected_totals(events: Iterable[Event]) -> dict[str, tuple[int, Decimal]]:
    """Per tenant: how many events, and the exact sum of their `customer_charge_usd`."""
    charges: dict[str, list[Decimal]] = {}
    for event in events:
        charges.setdefault(event["tenant_id"], []).append(Decimal(event["customer_charge_usd"]))
    return {tenant: (len(amounts), exact_sum(amounts)) for tenant, amounts in charges.items()}


async def assert_stored_exactly_once(pool: asyncpg.Pool, events: Sequence[Event]) -> None:
    """Each event is one row with its exact charge, and each tenant holds these events only."""
    ids = [event["gateway_request_id"] for event in events]
    assert len(set(ids)) == len(ids), "the test sent one id twice"
    rows = await stored_for(pool, ids)
    stored = Counter(row["gateway_request_id"] for row in rows)
    missing = [i for i in ids if i not in stored]
    assert not missing, f"{len(missing)} of {len(ids)} events not stored, e.g. {missing[:3]}"
    assert max(stored.values()) == 1, stored.most_common(3)
    charges = {row["gateway_request_id"]: row["customer_charge_usd"] for row in rows}
    for event in events:
        assert charges[event["gateway_request_id"]] == Decimal(event["customer_charge_usd"])
    for tenant, expected in expected_totals(events).items():
        assert await tenant_totals(pool, tenant) == expected, tenant


async def assert_none_stored(pool: asyncpg.Pool, events: Sequence[Event]) -> None:
    rows = await stored_for(pool, [event["gateway_request_id"] for event in events])
    assert rows == [], f"{len(rows)} events were stored that never should be"


def end_offsets(bootstrap_servers: str, topic: str, *, stable: bool = False) -> dict[int, int]:
    """The end of each partition of `topic`: the high watermark, or with `stable` the last
    stable offset (where a read_committed reader must stop: the first record of a transaction
    still open). Blocks: use `asyncio.to_thread`."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": "interop-watermarks",
            "enable.auto.commit": False,
            # librdkafka's default is read_committed, which answers the last stable offset.
            "isolation.level": "read_committed" if stable else "read_uncommitted",
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        return {p: _high_watermark(consumer, TopicPartition(topic, p)) for p in partitions}
    finally:
        consumer.close()


def _high_watermark(consumer: Consumer, partition: TopicPartition, within: float = 30) -> int:
    # A topic created a moment ago may have no leader yet ("not leader for partition", which
    # librdkafka does not flag as retriable here): ask again until the deadline.
    deadline = time.monotonic() + within
    while True:
        try:
            _, high = consumer.get_watermark_offsets(partition, timeout=within)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        else:
            return int(high)


async def consume_until_idle(
    topics: PipelineTopics, *, idle_seconds: float = 2, within: float = 180
) -> dict[str, Any]:
    """Run `llm-usage consume usage --exit-when-idle` to the end; return its closing totals.

    Fails at the first error the consumer logs (e.g. a batch it cannot decode, which stops that
    partition for good), instead of waiting for an idleness that will never come.
    """
    consumer = await spawn_consumer(topics, "--exit-when-idle", str(idle_seconds))
    deadline = time.monotonic() + within
    while consumer.process.returncode is None:
        errors = [line for line in consumer.lines if '"level": "error"' in line]
        if errors or time.monotonic() > deadline:
            await consumer.killed()
            problem = errors[0] if errors else f"it was not idle after {within}s"
            raise AssertionError(f"the consumer failed: {problem}\n{consumer.log_tail()}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(consumer.process.wait(), 0.5)
    code = await consumer.finished(within=30)
    assert code == 0, consumer.log_tail()
    [stopped] = consumer.logged("Consumer stopped.")
    return stopped


class RdkafkaProducer:
    """A confluent_kafka (librdkafka) producer that keeps every delivery report and statistic.

    Idempotent with acks=all unless `config` says otherwise. Calls block: from a test whose
    event loop must keep running (a consumer's log reader), call them via `asyncio.to_thread`.
    """

    def __init__(
        self, bootstrap_servers: str, config: Mapping[str, str | int | bool] | None = None
    ) -> None:
        self.failures: list[str] = []
        self.partitions: Counter[int] = Counter()
        self._statistics: list[str] = []
        self.client = Producer(
            {
                "bootstrap.servers": bootstrap_servers,
                "enable.idempotence": True,
                "acks": "all",
                "statistics.interval.ms": 200,
                "stats_cb": self._statistics.append,
                **(config or {}),
            }
        )

    def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        """Queue one record; `partition` None lets librdkafka's partitioner choose."""
        self.client.produce(
            topic,
            value=value,
            key=key,
            partition=-1 if partition is None else partition,
            headers=list(headers or []),
            on_delivery=self._delivered,
        )
        self.client.poll(0)

    def flush(self, timeout: float = 60) -> None:
        """Wait for every queued record's delivery report; fail on any error."""
        left = self.client.flush(timeout)
        assert left == 0, f"{left} records still unacknowledged after {timeout}s"
        assert not self.failures, f"{len(self.failures)} not delivered: {self.failures[:3]}"

    def statistics(self, *, transmitted: int, within: float = 20) -> dict[str, Any]:
        """librdkafka's newest statistics once they count `transmitted` records sent."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.client.poll(0.1)
            if self._statistics:
                latest: dict[str, Any] = json.loads(self._statistics[-1])
                if latest["txmsgs"] >= transmitted:
                    return latest
        raise AssertionError(f"librdkafka never reported {transmitted} records transmitted")

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.failures.append(str(error))
        else:
            partition = message.partition()
            assert partition is not None
            self.partitions[partition] += 1


async def dead_letter_ends(topics: PipelineTopics) -> dict[int, int]:
    """End offsets of the test's DLQ: compare before and after to see whether anything landed."""
    return await asyncio.to_thread(end_offsets, topics.settings.kafka_bootstrap_servers, topics.dlq)
