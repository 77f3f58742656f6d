"""The batch loop every consumer runs: fetch, land in one transaction, dead-letter, commit.

Delivery is at least once; the handler's writes are idempotent, so the effect is exactly once.
Offsets move only after the batch's database transaction and its dead letters have landed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeAlias

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from llm_usage.consumers.runtime.dead_letters import DeadLetter, publish_dead_letters
from llm_usage.consumers.runtime.health import HealthState
from llm_usage.consumers.runtime.metrics import ConsumerMetrics
from llm_usage.consumers.runtime.retry import is_transient, retry_transient
from llm_usage.schemas.dead_letter import DeadLetterReason

log = structlog.get_logger(__name__)

# aiokafka ships no types: a record is whatever its ConsumerRecord is (bytes key and value).
Record: TypeAlias = ConsumerRecord

# Errors where PostgreSQL refused a value, not the batch: the offending record is found by
# splitting the batch and is dead-lettered alone, so one bad row never stops a partition.
_ROW_REJECTED_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,  # SQLSTATE class 22, raised by the server
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions._base.DataError,  # a value asyncpg could not encode
)


@dataclass
class BatchOutcome:
    """What the handler did with a batch: counts by result, and what must be dead-lettered."""

    counts: Counter[str] = field(default_factory=Counter)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def merge(self, other: BatchOutcome) -> BatchOutcome:
        return BatchOutcome(self.counts + other.counts, self.dead_letters + other.dead_letters)


class BatchHandler(Protocol):
    """Lands a batch in one database transaction; safe to call again with the same records."""

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome: ...


@dataclass(frozen=True)
class LoopOptions:
    max_batch: int = 5000
    poll_timeout_ms: int = 500
    retry_seconds: float = 60.0
    exit_when_idle: float | None = None
    # How long a rebalance waits for the batch in flight before giving its partitions away.
    revoke_wait_seconds: float = 20.0


class BatchConsumer(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Runs one consumer until `stopping` is set (or it has been idle long enough)."""

    def __init__(
        self,
        *,
        name: str,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        handler: BatchHandler,
        dlq_topic: str,
        metrics: ConsumerMetrics,
        health: HealthState,
        stopping: asyncio.Event,
        options: LoopOptions,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._name = name
        self._consumer = consumer
        self._producer = producer
        self._handler = handler
        self._dlq_topic = dlq_topic
        self._metrics = metrics
        self._health = health
        self._stopping = stopping
        self._options = options
        self._clock = clock
        self._landed: dict[TopicPartition, int] = {}  # next offsets in Postgres, not yet committed
        self._batch_done = asyncio.Event()
        self._batch_done.set()
        self._idle_since: float | None = None
        self.totals: Counter[str] = Counter()
        # perf_counter() of the first batch fetched and of the last commit (for benchmarks).
        self.first_fetch_at: float | None = None
        self.last_commit_at: float | None = None

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Fetch and land batches until asked to stop; commit what landed before returning."""
        self._health.set_ready(True)
        while not self._stopping.is_set():
            fetched = await self._consumer.getmany(
                timeout_ms=self._options.poll_timeout_ms, max_records=self._options.max_batch
            )
            self._health.progressed()
            records = [record for batch in fetched.values() for record in batch]
            if records:
                self._idle_since = None
                await self._land(fetched, records)
            elif await self._idle_long_enough():
                log.info("Stopping: at the end of every partition.", consumer=self._name)
                break
            await self._update_lag()
        await self._commit_landed()

    async def _land(
        self, fetched: Mapping[TopicPartition, list[Record]], records: list[Record]
    ) -> None:
        started = time.perf_counter()
        if self.first_fetch_at is None:
            self.first_fetch_at = started
        self._batch_done.clear()
        try:
            outcome = await retry_transient(
                lambda: self._record_or_isolate(records),
                name="database",
                give_up_after=self._options.retry_seconds,
                stopping=self._stopping,
                on_retry=self._count_retry,
            )
            await retry_transient(
                lambda: publish_dead_letters(
                    self._producer, self._dlq_topic, outcome.dead_letters, failed_at=self._clock()
                ),
                name="dead_letter_publish",
                give_up_after=self._options.retry_seconds,
                stopping=self._stopping,
                on_retry=self._count_retry,
            )
        except Exception as error:
            if not is_transient(error):
                raise
            self._rewind(fetched, error)
            return
        finally:
            self._batch_done.set()

        for tp, batch in fetched.items():
            self._landed[tp] = batch[-1].offset + 1
        await self._commit_landed()
        self.last_commit_at = time.perf_counter()
        self._health.set_ready(True)
        self._observe(outcome, len(records), time.perf_counter() - started)

    async def _record_or_isolate(self, records: Sequence[Record]) -> BatchOutcome:
        """Land `records`; a row PostgreSQL refuses is dead-lettered alone. If it refuses every
        row of a batch, the cause is not the data (a new constraint, a broken schema): stop
        instead of dead-lettering the whole stream."""
        try:
            return await self._handler.record_batch(records)
        except _ROW_REJECTED_ERRORS as error:
            outcome = await self._isolate(records, error)
        if outcome.counts.pop("rejected_by_database", 0) == len(records) > 1:
            raise RuntimeError(
                f"PostgreSQL refused every one of {len(records)} records; "
                "this is not bad input: check the table's constraints and migrations"
            )
        return outcome

    async def _isolate(self, records: Sequence[Record], error: BaseException) -> BatchOutcome:
        """`records` failed with `error`: dead-letter a lone record, else land each half."""
        if len(records) == 1:
            record = records[0]
            detail = f"rejected by the database: {type(error).__name__}: {error}"
            log.error(
                "The database refused a record that passed validation; dead-lettering it.",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                detail=detail,
            )
            letter = DeadLetter(record, DeadLetterReason.SCHEMA_VIOLATION, detail[:500])
            return BatchOutcome(Counter({"dead_lettered": 1, "rejected_by_database": 1}), [letter])
        outcome = BatchOutcome()
        middle = len(records) // 2
        for half in (records[:middle], records[middle:]):
            try:
                landed = await self._handler.record_batch(half)
            except _ROW_REJECTED_ERRORS as half_error:
                landed = await self._isolate(half, half_error)
            outcome = outcome.merge(landed)
        return outcome

    def _rewind(self, fetched: Mapping[TopicPartition, list[Record]], error: BaseException) -> None:
        """A batch that did not land is fetched again from its first offset, never committed."""
        self._health.set_ready(False, f"batch not landed: {type(error).__name__}")
        log.error(
            "Batch did not land; it will be fetched again.",
            consumer=self._name,
            error=f"{type(error).__name__}: {error}",
            stopping=self._stopping.is_set(),
        )
        for tp, batch in fetched.items():
            # A partition revoked meanwhile is skipped: its new owner starts from the last commit.
            with contextlib.suppress(IllegalStateError):
                self._consumer.seek(tp, batch[0].offset)

    # -- offsets --------------------------------------------------------------------------------

    async def _commit_landed(self) -> None:
        """Commit the offsets of every landed batch. A lost race with a rebalance is harmless:
        the new owner re-reads those records and the idempotent write drops them as duplicates."""
        held = self._consumer.assignment()
        for tp in [tp for tp in self._landed if tp not in held]:
            # Revoked: its new owner re-reads from the last commit; the rows are deduplicated.
            del self._landed[tp]
        if not self._landed:
            return
        offsets = dict(self._landed)
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as error:
            log.warning(
                "Offsets not committed after a rebalance; those records will be redelivered "
                "and counted as duplicates.",
                consumer=self._name,
                error=str(error),
            )
        except KafkaError as error:
            log.warning("Offset commit failed; will retry with the next batch.", error=str(error))
            return
        for tp, offset in offsets.items():
            if self._landed.get(tp) == offset:
                del self._landed[tp]

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before giving partitions away, let the batch in flight land and commit it."""
        try:
            await asyncio.wait_for(self._batch_done.wait(), self._options.revoke_wait_seconds)
        except TimeoutError:
            log.warning("Rebalance did not wait for a slow batch; it will be redelivered.")
        await self._commit_landed()
        for tp in revoked:
            with contextlib.suppress(KeyError):  # no lag was reported for it yet
                self._metrics.lag.remove(self._name, tp.topic, str(tp.partition))
        if revoked:
            log.info("Partitions revoked.", consumer=self._name, partitions=_names(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("Partitions assigned.", consumer=self._name, partitions=_names(assigned))

    # -- idleness, lag, metrics -----------------------------------------------------------------

    async def _at_end_of_every_partition(self) -> bool:
        assigned = self._consumer.assignment()
        if not assigned:
            return False
        try:
            for tp in assigned:
                highwater = self._consumer.highwater(tp)
                if highwater is None or await self._consumer.position(tp) < highwater:
                    return False
        except (IllegalStateError, AssertionError):  # revoked while we looked: not idle yet
            return False
        return True

    async def _idle_long_enough(self) -> bool:
        if self._options.exit_when_idle is None:
            return False
        if not await self._at_end_of_every_partition():
            self._idle_since = None
            return False
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since >= self._options.exit_when_idle

    async def _update_lag(self) -> None:
        for tp in self._consumer.assignment():
            try:
                highwater = self._consumer.highwater(tp)
                if highwater is None:
                    continue
                position = await self._consumer.position(tp)
            except (IllegalStateError, AssertionError):  # revoked while we looked
                continue
            self._metrics.lag.labels(self._name, tp.topic, str(tp.partition)).set(
                max(highwater - position, 0)
            )

    def _count_retry(self, operation: str) -> None:
        self._metrics.retries.labels(self._name, operation).inc()
        self._health.progressed()  # waiting out an outage is not a stalled loop
        self._health.set_ready(False, f"retrying {operation}")

    def _observe(self, outcome: BatchOutcome, size: int, seconds: float) -> None:
        self.totals.update(outcome.counts)
        for result, count in outcome.counts.items():
            self._metrics.events.labels(self._name, result).inc(count)
        for letter in outcome.dead_letters:
            self._metrics.dead_letters.labels(self._name, letter.reason.value).inc()
            log.warning(
                "Record dead-lettered.",
                consumer=self._name,
                topic=letter.record.topic,
                partition=letter.record.partition,
                offset=letter.record.offset,
                reason=letter.reason.value,
                detail=letter.detail,
            )
        self._metrics.batch_size.labels(self._name).observe(size)
        self._metrics.batch_duration.labels(self._name).observe(seconds)
        log.debug("Batch landed.", consumer=self._name, size=size, seconds=round(seconds, 4))


def _names(partitions: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)
