"""The batch loop's decisions, driven through stand-ins for the Kafka clients and the handler.

What the loop promises here: offsets move only after a batch landed; a batch that did not land is
fetched again; a row the database refuses is dead-lettered alone; a refusal of every row stops.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from llm_usage.consumers.runtime.health import HealthState
from llm_usage.consumers.runtime.loop import BatchConsumer, BatchOutcome, LoopOptions, Record
from llm_usage.consumers.runtime.metrics import ConsumerMetrics
from tests.records import consumer_record

TP = TopicPartition("usage", 0)  # where tests.records puts its records


def record(offset: int, value: bytes) -> Record:
    return consumer_record(value, offset=offset)


class StandInConsumer:
    """Hands out the given batches, then asks the loop to stop; remembers seeks and commits."""

    def __init__(self, batches: list[list[Record]], stopping: asyncio.Event) -> None:
        self.batches = batches
        self.stopping = stopping
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, int]] = []

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, Any]:
        if not self.batches:
            self.stopping.set()
            return {}
        return {TP: self.batches.pop(0)}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def highwater(self, tp: TopicPartition) -> int:
        return 0

    async def position(self, tp: TopicPartition) -> int:
        return 0


class StandInProducer:
    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[tuple[bytes | None, list[tuple[str, bytes]]]] = []

    async def send_and_wait(
        self, topic: str, *, key: bytes | None, value: bytes | None, headers: Any
    ) -> None:
        if self.fail:
            raise KafkaConnectionError("broker went away")
        self.sent.append((value, headers))


class RefusesBadRows:
    """Lands a batch unless it holds a record whose value is b"bad" (a CHECK violation)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.calls = 0

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome:
        self.calls += 1
        if self.error is not None:
            raise self.error
        if any(r.value == b"bad" for r in records):
            raise asyncpg.exceptions.CheckViolationError("violates check constraint")
        return BatchOutcome(Counter({"recorded": len(records)}))


def loop_for(
    batches: list[list[Record]], handler: RefusesBadRows, producer: StandInProducer
) -> tuple[BatchConsumer, StandInConsumer]:
    stopping = asyncio.Event()
    consumer = StandInConsumer(batches, stopping)
    loop = BatchConsumer(
        name="test",
        consumer=consumer,
        producer=producer,
        handler=handler,
        dlq_topic="usage.dlq",
        metrics=ConsumerMetrics.create(CollectorRegistry()),
        health=HealthState(),
        stopping=stopping,
        options=LoopOptions(retry_seconds=0.3),
    )
    return loop, consumer


async def test_a_row_the_database_refuses_is_dead_lettered_alone_and_the_rest_land() -> None:
    batch = [record(offset, b"bad" if offset == 13 else b"ok") for offset in range(10, 17)]
    producer = StandInProducer()
    loop, consumer = loop_for([batch], RefusesBadRows(), producer)
    await loop.run()
    assert loop.totals == {"recorded": 6, "dead_lettered": 1}
    [(value, headers)] = producer.sent
    assert value == b"bad"
    assert dict(headers)["dlq.reason"] == b"schema_violation"
    assert dict(headers)["dlq.offset"] == b"13"
    assert consumer.commits == [{TP: 17}]


async def test_a_refusal_of_every_row_stops_instead_of_dead_lettering_the_stream() -> None:
    batch = [record(offset, b"bad") for offset in range(4)]
    producer = StandInProducer()
    loop, consumer = loop_for([batch], RefusesBadRows(), producer)
    with pytest.raises(RuntimeError, match="refused every one of 4 records"):
        await loop.run()
    assert consumer.commits == []


async def test_a_batch_that_does_not_land_is_fetched_again_never_committed() -> None:
    batch = [record(offset, b"ok") for offset in range(20, 25)]
    handler = RefusesBadRows(error=ConnectionRefusedError("database is down"))
    loop, consumer = loop_for([batch], handler, StandInProducer())
    await loop.run()
    assert handler.calls >= 2, "a transient failure is retried before giving up"
    assert consumer.seeks == [(TP, 20)]
    assert consumer.commits == []


async def test_dead_letters_not_acknowledged_means_no_commit() -> None:
    batch = [record(0, b"ok"), record(1, b"bad")]
    loop, consumer = loop_for([batch], RefusesBadRows(), StandInProducer(fail=True))
    await loop.run()
    assert consumer.seeks == [(TP, 0)]
    assert consumer.commits == []
