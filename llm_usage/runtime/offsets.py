"""Which offsets may be committed: those of batches that landed, in the assignment that
fetched them. A batch that outlived its assignment never commits or seeks: a partition that came
back in a newer assignment may already be further on, and its offset must never go back. And the
lag gauge, measured from those commits to the last stable offset."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import TopicPartition

from llm_usage.runtime.metrics import ConsumerMetrics

log = structlog.get_logger(__name__)


class OffsetLedger:
    """Landed-but-uncommitted offsets per partition, tagged with the assignment generation."""

    def __init__(self, consumer: AIOKafkaConsumer, *, name: str) -> None:
        self._consumer = consumer
        self._name = name
        self.generation = 0
        self._landed: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}  # the last offsets this member committed
        self._settled = asyncio.Event()
        self._settled.set()

    def begin_revocation(self) -> None:
        """A rebalance has begun: no new batch lands until the generation has ended."""
        self._settled.clear()

    async def settled(self) -> None:
        """Return once no revocation is under way."""
        await self._settled.wait()

    def end_generation(self) -> None:
        """The partitions are being given up (a rebalance): every batch fetched before now is
        stale, whatever the next assignment holds."""
        self.generation += 1
        self._landed.clear()
        self._settled.set()

    def is_current(self, generation: int) -> bool:
        return generation == self.generation

    def landed(self, next_offsets: Mapping[TopicPartition, int], *, generation: int) -> bool:
        """Note a batch's next offsets; False (and nothing noted) if its assignment is gone."""
        if not self.is_current(generation):
            log.warning(
                "A batch landed after its partitions were reassigned; its offsets are not "
                "committed (the new assignment reads those records again as duplicates).",
                consumer=self._name,
            )
            return False
        self._landed.update(next_offsets)
        return True

    def forget(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._landed.pop(tp, None)
            self.committed.pop(tp, None)

    async def commit(self) -> None:
        """Commit what landed. A lost race with a rebalance is harmless: the new owner re-reads
        those records and the idempotent write counts them as duplicates."""
        held = self._consumer.assignment()
        offsets = {tp: offset for tp, offset in self._landed.items() if tp in held}
        self._landed = dict(offsets)
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as error:
            log.warning(
                "Offsets not committed after a rebalance; those records will be redelivered "
                "and counted as duplicates.",
                consumer=self._name,
                error=str(error),
            )
            return
        except KafkaError as error:
            log.warning("Offset commit failed; will retry with the next batch.", error=str(error))
            return
        self.committed.update(offsets)
        for tp, offset in offsets.items():
            if self._landed.get(tp) == offset:
                del self._landed[tp]


async def report_lag(
    consumer: AIOKafkaConsumer,
    ledger: OffsetLedger,
    metrics: ConsumerMetrics,
    *,
    name: str,
    handed_out: Mapping[TopicPartition, int],
) -> None:
    """Set the lag gauge: records between where this member is done and the readable end.

    The end is the last stable offset (read_committed reads no further; the high watermark
    counts the open transaction's records and every transaction's commit marker, which are never
    delivered, so a partition whose last write was a transaction would show lag 1 forever). Where
    this member is done is its last commit, or — once every record handed out (`handed_out`:
    the offset after the last record each partition gave the loop) is committed — the consumer's
    position, which moves past commit markers and aborted records. Such a skipped tail is then
    committed too, so that the group's committed offsets (what KEDA and `kafka-consumer-groups`
    measure) reach the end as well. No fetch is in flight when this runs, so the position says
    nothing about records the loop has not seen. Called without an extra round trip: the ends
    are what the last fetch response said."""
    skipped: dict[TopicPartition, int] = {}
    generation = ledger.generation  # a rebalance while we look makes what we saw stale
    for tp in consumer.assignment():
        try:
            end = readable_end(consumer, tp)
            if end is None:
                continue
            position = await consumer.position(tp)
        except (IllegalStateError, AssertionError):  # revoked while we looked
            continue
        committed = ledger.committed.get(tp)
        if committed is None:
            start = position
        elif handed_out.get(tp, committed) <= committed and position > committed:
            start = skipped[tp] = position
        else:
            start = committed
        metrics.lag.labels(name, tp.topic, str(tp.partition)).set(max(end - start, 0))
    if skipped and ledger.is_current(generation):
        ledger.landed(skipped, generation=generation)
        await ledger.commit()


def readable_end(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The offset after the last record this consumer can read from `tp`, as of the last fetch:
    the last stable offset (read_committed), else the high watermark; None before any fetch."""
    stable: int | None = consumer.last_stable_offset(tp)
    if stable is not None and stable >= 0:
        return stable
    highwater: int | None = consumer.highwater(tp)
    return highwater
