"""Fetching records: a poll that shutdown can interrupt, and partitions that stop — never skip —
at a record batch that cannot be decoded.

aiokafka raises a batch it cannot decode (corrupt, or compressed with a codec it lacks) out of
`getmany`, and drops whatever it had already read for other partitions in the same call while
moving their positions on. So after any such error every partition is put back exactly where this
member last received a record (or at its committed offset), each partition is then fetched alone
to find the one that fails, and that one is paused at the failing offset, with a log line naming
topic, partition and offset, a metric, and `/readyz` false. It is tried again every
`retry_stopped_seconds`; the other partitions keep moving.

`--exit-when-idle` is decided here too: at the end of every held partition for long enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import IllegalStateError
from aiokafka.structs import TopicPartition

from llm_usage.runtime.handler import Record
from llm_usage.runtime.metrics import ConsumerMetrics
from llm_usage.runtime.offsets import readable_end
from llm_usage.runtime.probes import HealthState
from llm_usage.runtime.retry import is_transient, sleep_unless_stopping

log = structlog.get_logger(__name__)

Fetched = Mapping[TopicPartition, list[Record]]


@dataclass(frozen=True)
class StoppedPartition:
    offset: int
    error: str
    since: float


class Fetcher:
    """The one place that reads from and moves the position of the Kafka consumer."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        name: str,
        stopping: asyncio.Event,
        metrics: ConsumerMetrics,
        health: HealthState,
        poll_timeout_ms: int,
        max_batch: int,
        retry_stopped_seconds: float = 60.0,
    ) -> None:
        self._consumer = consumer
        self._name = name
        self._stopping = stopping
        self._metrics = metrics
        self._health = health
        self._poll_timeout_ms = poll_timeout_ms
        self._max_batch = max_batch
        self._retry_stopped_seconds = retry_stopped_seconds
        self._next: dict[TopicPartition, int] = {}  # after the last record handed to the loop
        self.stopped: dict[TopicPartition, StoppedPartition] = {}

    async def poll(self) -> Fetched | None:
        """The next records (possibly none), or None once shutdown was asked for."""
        self._resume_stopped_partitions_due()
        try:
            fetched = await self._getmany_unless_stopping()
        except Exception as error:  # noqa: BLE001 - whatever a batch raises, no record is skipped
            if is_transient(error):
                log.warning("Fetch failed; fetching again.", error=f"{type(error).__name__}")
                return {}
            await self._stop_undecodable_partitions(error)
            return {}
        if fetched is None:
            return None
        for tp, records in fetched.items():
            if records:
                self._next[tp] = records[-1].offset + 1
        return fetched

    @property
    def handed_out(self) -> Mapping[TopicPartition, int]:
        """Per partition, the offset after the last record handed to the loop (or where a
        rewind put it back)."""
        return self._next

    def rewind(self, fetched: Fetched) -> None:
        """A batch that did not land is fetched again from its first offset."""
        for tp, records in fetched.items():
            if records:
                self._seek(tp, records[0].offset)

    def forget(self, revoked: set[TopicPartition]) -> None:
        """Revoked partitions: their next owner starts from the last commit."""
        for tp in revoked:
            self._next.pop(tp, None)
            if self.stopped.pop(tp, None) is not None:
                self._health.release(_hold_name(tp))
        self._metrics.stopped_partitions.labels(self._name).set(len(self.stopped))

    async def _getmany_unless_stopping(self) -> Fetched | None:
        """`getmany`, raced against shutdown: during a rebalance it can wait without bound."""
        getting = asyncio.ensure_future(
            self._consumer.getmany(timeout_ms=self._poll_timeout_ms, max_records=self._max_batch)
        )
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({getting, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not getting.done():
            # Nothing was handed out yet (getmany drains its buffers without awaiting), so
            # cancelling loses nothing: uncommitted records are read again by the next owner.
            getting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await getting
            return None
        fetched: Fetched = getting.result()
        return fetched

    async def _stop_undecodable_partitions(self, error: BaseException) -> None:
        try:
            partitions = sorted(self._consumer.assignment() - set(self.stopped))
            for tp in partitions:
                await self._put_back(tp)
            for tp in partitions:
                await self._probe(tp)
        except IllegalStateError:
            return  # a rebalance moved partitions meanwhile; the next owner starts from commits
        if not any(tp in self.stopped for tp in partitions):
            log.error(
                "Fetching failed, but no single partition fails on its own; fetching again.",
                consumer=self._name,
                error=f"{type(error).__name__}: {error}",
            )
            await sleep_unless_stopping(self._stopping)(1.0)

    async def _put_back(self, tp: TopicPartition) -> None:
        """Move `tp` to right after the last record handed out (or to its committed offset)."""
        if tp in self._next:
            self._seek(tp, self._next[tp])
            return
        committed = await self._consumer.committed(tp)
        if committed is None:
            await self._consumer.seek_to_beginning(tp)  # a new group reads from the earliest
        else:
            self._seek(tp, committed)

    async def _probe(self, tp: TopicPartition) -> None:
        """Fetch `tp` alone; stop it if it fails. Its records are read again by the loop."""
        offset = await self._consumer.position(tp)
        try:
            await self._consumer.getmany(tp, timeout_ms=self._poll_timeout_ms)
        except Exception as error:  # noqa: BLE001 - the probe is looking for exactly this
            if not is_transient(error):
                self._stop(tp, offset, error)
        finally:
            self._seek(tp, offset)

    def _stop(self, tp: TopicPartition, offset: int, error: BaseException) -> None:
        self._consumer.pause(tp)
        self.stopped[tp] = StoppedPartition(offset, f"{type(error).__name__}: {error}", _now())
        self._metrics.undecodable_batches.labels(self._name, tp.topic, str(tp.partition)).inc()
        self._metrics.stopped_partitions.labels(self._name).set(len(self.stopped))
        self._health.hold(
            _hold_name(tp), f"{tp.topic}[{tp.partition}] stopped at offset {offset}: undecodable"
        )
        log.error(
            "Cannot decode a record batch: this partition is stopped at that offset and nothing "
            "after it is read or skipped until it can be; see docs/operations.md.",
            consumer=self._name,
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            error=f"{type(error).__name__}: {error}",
        )

    def _resume_stopped_partitions_due(self) -> None:
        due = [
            tp
            for tp, stopped in self.stopped.items()
            if _now() - stopped.since >= self._retry_stopped_seconds
        ]
        for tp in due:
            del self.stopped[tp]
            self._health.release(_hold_name(tp))
            with contextlib.suppress(IllegalStateError):
                self._consumer.resume(tp)
            log.info(
                "Trying a stopped partition again.",
                consumer=self._name,
                topic=tp.topic,
                partition=tp.partition,
            )
        if due:
            self._metrics.stopped_partitions.labels(self._name).set(len(self.stopped))

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        with contextlib.suppress(IllegalStateError):  # revoked meanwhile: the next owner decides
            self._consumer.seek(tp, offset)
        self._next[tp] = offset


def _hold_name(tp: TopicPartition) -> str:
    return f"stopped:{tp.topic}:{tp.partition}"


def _now() -> float:
    return time.monotonic()


class IdleDetector:
    """`--exit-when-idle`: at the end of every held partition for `idle_seconds` in a row."""

    def __init__(self, consumer: AIOKafkaConsumer, *, idle_seconds: float | None) -> None:
        self._consumer = consumer
        self._idle_seconds = idle_seconds
        self._idle_since: float | None = None

    def busy(self) -> None:
        self._idle_since = None

    async def idle_long_enough(self) -> bool:
        if self._idle_seconds is None:
            return False
        if not await self._at_end_of_every_partition():
            self._idle_since = None
            return False
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since >= self._idle_seconds

    async def _at_end_of_every_partition(self) -> bool:
        assigned = self._consumer.assignment()
        if not assigned or self._consumer.paused():  # a stopped partition is never "done"
            return False
        try:
            for tp in assigned:
                # The last stable offset: a commit marker or an open transaction is not "more".
                end = readable_end(self._consumer, tp)
                if end is None or await self._consumer.position(tp) < end:
                    return False
        except (IllegalStateError, AssertionError):  # revoked while we looked: not idle yet
            return False
        return True
