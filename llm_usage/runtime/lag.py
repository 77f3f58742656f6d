"""The lag gauge: records between what this member committed and each partition's end."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import IllegalStateError

from llm_usage.runtime.metrics import ConsumerMetrics
from llm_usage.runtime.offsets import OffsetLedger


async def report_lag(
    consumer: AIOKafkaConsumer, ledger: OffsetLedger, metrics: ConsumerMetrics, *, name: str
) -> None:
    """Set the gauge from the last committed offset, or the fetch position before any commit
    (the high watermark is what the last fetch response said: no extra round trip)."""
    for tp in consumer.assignment():
        try:
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            start = ledger.committed.get(tp)
            if start is None:
                start = await consumer.position(tp)
        except (IllegalStateError, AssertionError):  # revoked while we looked
            continue
        metrics.lag.labels(name, tp.topic, str(tp.partition)).set(max(highwater - start, 0))
