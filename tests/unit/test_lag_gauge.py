"""The lag gauge against the last stable offset, and commit markers stepped over once idle."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from llm_usage.runtime.metrics import ConsumerMetrics
from llm_usage.runtime.offsets import OffsetLedger, report_lag

TP = TopicPartition("usage", 0)


class Consumer:
    """What report_lag reads: the ends the last fetch saw, the position, commits."""

    def __init__(self, *, position: int, stable: int | None, highwater: int) -> None:
        self._position, self._stable, self._highwater = position, stable, highwater
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def last_stable_offset(self, tp: TopicPartition) -> int | None:
        return self._stable

    def highwater(self, tp: TopicPartition) -> int:
        return self._highwater

    async def position(self, tp: TopicPartition) -> int:
        return self._position

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


async def lag_after(consumer: Consumer, *, committed: int | None, handed_out: int | None) -> float:
    registry = CollectorRegistry()
    metrics = ConsumerMetrics.create(registry)
    ledger = OffsetLedger(consumer, name="usage")
    if committed is not None:
        ledger.committed[TP] = committed
    handed: dict[TopicPartition, int] = {} if handed_out is None else {TP: handed_out}
    await report_lag(consumer, ledger, metrics, name="usage", handed_out=handed)
    value: Any = registry.get_sample_value(
        "llm_usage_consumer_lag", {"consumer": "usage", "topic": "usage", "partition": "0"}
    )
    return float(value)


async def test_after_a_commit_marker_lag_is_zero_and_the_position_is_committed() -> None:
    # Records 0..9 stored and committed (10); offset 10 is the transaction's commit marker.
    consumer = Consumer(position=11, stable=11, highwater=11)
    assert await lag_after(consumer, committed=10, handed_out=10) == 0
    assert consumer.commits == [{TP: 11}]


async def test_records_in_hand_count_from_the_last_commit() -> None:
    # 10..14 handed out and not yet landed: the position says nothing about them.
    consumer = Consumer(position=16, stable=20, highwater=21)
    assert await lag_after(consumer, committed=10, handed_out=15) == 10
    assert consumer.commits == []


async def test_an_open_transaction_is_not_lag_yet() -> None:
    # Records from 30 on belong to a transaction still open: read_committed stops at 30.
    consumer = Consumer(position=30, stable=30, highwater=45)
    assert await lag_after(consumer, committed=30, handed_out=30) == 0
    assert consumer.commits == []


@pytest.mark.parametrize("stable", [None, -1])
async def test_without_a_stable_offset_the_high_watermark_is_the_end(stable: int | None) -> None:
    consumer = Consumer(position=7, stable=stable, highwater=9)
    assert await lag_after(consumer, committed=None, handed_out=None) == 2
    assert consumer.commits == []
