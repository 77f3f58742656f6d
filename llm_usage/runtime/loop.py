"""The batch loop every consumer runs: fetch, land in one transaction, dead-letter, commit.

Delivery is at least once; the handler's writes are idempotent, so the effect is exactly once.
Offsets move only after the batch's database transaction and its dead letters have landed, and
only while the assignment that fetched the batch still holds.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import structlog
from aiokafka import AIOKafkaConsumer

from llm_usage.core.errors import TransientError
from llm_usage.runtime.ahead import PreparesAhead
from llm_usage.runtime.dead_letters import DeadLetterSink
from llm_usage.runtime.fetching import Fetched, Fetcher, IdleDetector
from llm_usage.runtime.handler import BatchHandler, BatchOutcome, BatchResult, Record
from llm_usage.runtime.isolation import RefusalGuard, record_isolating_refusals
from llm_usage.runtime.metrics import ConsumerMetrics
from llm_usage.runtime.offsets import OffsetLedger, report_lag
from llm_usage.runtime.probes import HealthState
from llm_usage.runtime.rebalance import RebalanceListener
from llm_usage.runtime.retry import cancel_quietly, is_transient, retry_transient
from llm_usage.schemas.dead_letter import DeadLetterReason

log = structlog.get_logger(__name__)

_BATCH_HOLD = "batch"


class Polled(NamedTuple):
    fetched: Fetched  # by partition
    generation: int  # of the assignment that fetched them
    records: list[Record]  # all of them, in one list


class BatchAbandonedError(TransientError):
    """Shutdown could not wait for the batch in hand any longer; nothing of it is committed."""


@dataclass(frozen=True)
class LoopOptions:
    max_batch: int = 5000
    poll_timeout_ms: int = 500
    # One budget for everything a batch retries (database, then dead letters): it must end well
    # before Kafka's max.poll.interval.ms, or the member is evicted from its group.
    retry_seconds: float = 60.0
    exit_when_idle: float | None = None
    # How long a rebalance waits for the batch in flight before giving its partitions away.
    revoke_wait_seconds: float = 20.0
    # How often a partition stopped at an undecodable batch is tried again.
    retry_stopped_seconds: float = 60.0
    # After SIGTERM, how long the batch in hand may still take to land before it is abandoned
    # (a query hanging on a lock must not keep a pod past its termination grace period).
    shutdown_grace_seconds: float = 10.0


class BatchConsumer:
    """Runs one consumer until `stopping` is set (or it has been idle long enough)."""

    def __init__(
        self,
        *,
        name: str,
        consumer: AIOKafkaConsumer,
        handler: BatchHandler,
        dead_letters: DeadLetterSink | None,
        metrics: ConsumerMetrics,
        health: HealthState,
        stopping: asyncio.Event,
        options: LoopOptions,
        clock: Callable[[], datetime],
    ) -> None:
        self._name = name
        self._consumer = consumer
        self._handler = handler
        self._prepare_ahead = handler.prepare_ahead if isinstance(handler, PreparesAhead) else None
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._health = health
        self._stopping = stopping
        self._options = options
        self._clock = clock
        self._ledger = OffsetLedger(consumer, name=name)
        self._fetcher = Fetcher(
            consumer,
            name=name,
            stopping=stopping,
            metrics=metrics,
            health=health,
            poll_timeout_ms=options.poll_timeout_ms,
            max_batch=options.max_batch,
            retry_stopped_seconds=options.retry_stopped_seconds,
        )
        self._idle = IdleDetector(consumer, idle_seconds=options.exit_when_idle)
        self._refusals = RefusalGuard()
        self._batch_done = asyncio.Event()
        self._batch_done.set()
        self.listener = RebalanceListener(
            name=name,
            ledger=self._ledger,
            batch_done=self._batch_done,
            metrics=metrics,
            health=health,
            revoke_wait_seconds=options.revoke_wait_seconds,
        )
        self.listener.revoked_listeners.append(self._fetcher.forget)
        # Every result and reason exists at 0 from the start: increase() then sees the first one.
        for result in BatchResult:
            metrics.events.labels(name, result.value)
        if dead_letters is not None:
            for reason in DeadLetterReason:
                metrics.dead_letters.labels(name, reason.value)
        self.totals: Counter[str] = Counter()

    async def run(self) -> None:
        """Fetch and land batches until asked to stop; commit what landed before returning.

        While behind, the next batch is fetched while the last one lands (so Kafka's record
        parsing and the broker round trip overlap PostgreSQL's work): at most two batches are in
        hand, and the next one's offsets move only once it has landed in turn. Once caught up,
        it is fetched after: fetched ahead, a record that arrives during a landing would wait
        for one more landing before its own (the budget consumer's alert latency).
        """
        polled = await self._poll()
        while polled is not None and not self._stopping.is_set():
            fetched, generation, records = polled
            self._health.progressed()
            if records:
                await self._ledger.settled()
            if records and not self._ledger.is_current(generation):
                # Fetched (ahead) before a rebalance that began while the previous batch landed:
                # its partitions' owners now read from their committed offsets. Landing it
                # anyway would store records whose offsets can no longer be committed here.
                polled = await self._poll()
                continue
            if not records:
                if await self._idle.idle_long_enough():
                    log.info("Stopping: at the end of every partition.", consumer=self._name)
                    break
                await self._report_lag()
                polled = await self._poll()
                continue
            self._idle.busy()
            next_poll = asyncio.create_task(self._poll_ahead()) if self._behind(records) else None
            try:
                landed = await self._land(fetched, records, generation=generation)
            except BaseException:
                if next_poll is not None:
                    await cancel_quietly(next_poll)
                raise
            if landed:
                polled = await (next_poll if next_poll is not None else self._poll())
            else:
                # Both go back to their first offsets, the batch fetched ahead first, so that
                # where they share a partition the earlier batch's offset is the one kept.
                ahead = await next_poll if next_poll is not None else None
                if ahead is not None:
                    self._rewind_if_current(ahead.fetched, ahead.generation)
                self._rewind_if_current(fetched, generation)
                polled = await self._poll()
            await self._report_lag()
        await self._ledger.commit()

    async def _report_lag(self) -> None:
        await report_lag(
            self._consumer,
            self._ledger,
            self._metrics,
            name=self._name,
            handed_out=self._fetcher.handed_out,
        )

    def _behind(self, records: list[Record]) -> bool:
        """A batch at least half the size asked for says more is waiting."""
        return 2 * len(records) >= self._options.max_batch

    async def _poll(self) -> Polled | None:
        """The next records with the assignment generation they were fetched in."""
        fetched = await self._fetcher.poll()
        if fetched is None:
            return None
        records = [record for batch in fetched.values() for record in batch]
        return Polled(fetched, self._ledger.generation, records)

    async def _poll_ahead(self) -> Polled | None:
        """`_poll`, while a batch lands; a handler that can starts preparing what came."""
        polled = await self._poll()
        if polled is not None and polled.records and self._prepare_ahead is not None:
            self._prepare_ahead(polled.records)
        return polled

    def _rewind_if_current(self, fetched: Fetched, generation: int) -> None:
        """A batch that did not land is fetched again from its first offset (unless its
        partitions were reassigned meanwhile: then the new assignment decides)."""
        if self._ledger.is_current(generation):
            self._fetcher.rewind(fetched)

    async def _land(self, fetched: Fetched, records: list[Record], *, generation: int) -> bool:
        """Land a batch and commit its offsets; False when it did not land (transiently)."""
        started = time.perf_counter()
        deadline = time.monotonic() + self._options.retry_seconds
        self._batch_done.clear()
        try:
            outcome = await self._unless_shutdown_takes_too_long(
                self._store_and_dead_letter(records, deadline)
            )
        except Exception as error:
            if not is_transient(error):
                raise
            self._give_up_on(error)
            return False
        else:
            for tp, batch in fetched.items():
                if batch:
                    self._ledger.landed({tp: batch[-1].offset + 1}, generation=generation)
        finally:
            self._batch_done.set()
        await self._ledger.commit()
        self._health.release(_BATCH_HOLD)
        self._observe(outcome, len(records), time.perf_counter() - started)
        return True

    async def _unless_shutdown_takes_too_long(
        self, landing: Coroutine[Any, Any, BatchOutcome]
    ) -> BatchOutcome:
        task = asyncio.create_task(landing)
        stop = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            done, _ = await asyncio.wait({task}, timeout=self._options.shutdown_grace_seconds)
            if not done:
                # A database that does not answer may not let the cancelled query end either:
                # give it a second, then leave it to the pool's terminate at shutdown.
                task.cancel()
                task.add_done_callback(lambda done: done.cancelled() or done.exception())
                await asyncio.wait({task}, timeout=1)
                raise BatchAbandonedError(
                    f"the batch did not land within {self._options.shutdown_grace_seconds} s "
                    "of the shutdown signal; its records are read again by the next owner"
                )
        return task.result()

    async def _store_and_dead_letter(self, records: list[Record], deadline: float) -> BatchOutcome:
        sink = self._dead_letters
        outcome = await retry_transient(
            lambda: record_isolating_refusals(
                self._handler, records, self._refusals, can_dead_letter=sink is not None
            ),
            name="database",
            deadline=deadline,
            stopping=self._stopping,
            on_retry=self._count_retry,
        )
        if outcome.dead_letters:
            if sink is None:
                raise TypeError(f"consumer {self._name!r} has dead letters but no sink for them")
            await retry_transient(
                lambda: sink.publish(outcome.dead_letters, failed_at=self._clock()),
                name="dead_letter_publish",
                deadline=deadline,
                stopping=self._stopping,
                on_retry=self._count_retry,
            )
        return outcome

    def _give_up_on(self, error: BaseException) -> None:
        self._health.hold(_BATCH_HOLD, f"batch not landed: {type(error).__name__}")
        log.error(
            "Batch did not land; it will be fetched again.",
            consumer=self._name,
            error=f"{type(error).__name__}: {error}",
            stopping=self._stopping.is_set(),
        )

    def _count_retry(self, operation: str) -> None:
        self._metrics.retries.labels(self._name, operation).inc()
        self._health.progressed()  # waiting out an outage is not a stalled loop
        self._health.hold(_BATCH_HOLD, f"retrying {operation}")

    def _observe(self, outcome: BatchOutcome, size: int, seconds: float) -> None:
        self.totals.update({result.value: count for result, count in outcome.counts.items()})
        for result, count in outcome.counts.items():
            self._metrics.events.labels(self._name, result.value).inc(count)
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
