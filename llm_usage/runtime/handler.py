"""What a worker gives the runtime (a consumer's spec, its batch handler, side tasks) and what
the runtime gives it back (the context built once at start-up, and a batch's outcome)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol, TypeAlias

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from llm_usage.core.settings import Settings
from llm_usage.runtime.metrics import ConsumerMetrics
from llm_usage.runtime.probes import HealthState
from llm_usage.schemas.dead_letter import DeadLetterReason

# aiokafka ships no types: a record is whatever its ConsumerRecord is (bytes key and value).
Record: TypeAlias = ConsumerRecord


class BatchResult(StrEnum):
    """What became of one record; also the `result` label of the events metric."""

    RECORDED = "recorded"  # a new row was stored
    DUPLICATE = "duplicate"  # known and equal: nothing changed
    CONFLICT = "conflict"  # known with different values: dead-lettered, the stored row stays
    DEAD_LETTERED = "dead_lettered"  # not stored; on the dead-letter topic with the reason
    REFUSED_BY_DATABASE = "refused_by_database"  # valid, but PostgreSQL refused the row
    REJECTED = "rejected"  # invalid, skipped by a consumer without a dead-letter topic
    DEFERRED = "deferred"  # a correction parked until its event is stored (or its wait ends)


@dataclass(frozen=True)
class DeadLetter:
    """A consumed record that will not be stored, and why."""

    record: Record
    reason: DeadLetterReason
    detail: str


@dataclass
class BatchOutcome:
    """What the handler did with a batch: counts by result, and what must be dead-lettered."""

    counts: Counter[BatchResult] = field(default_factory=Counter)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def merge(self, other: BatchOutcome) -> BatchOutcome:
        return BatchOutcome(self.counts + other.counts, self.dead_letters + other.dead_letters)


class BatchHandler(Protocol):
    """Lands a batch in one database transaction; safe to call again with the same records."""

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome: ...


@dataclass(frozen=True)
class WorkerContext:
    """Built once by the process shell and handed to everything a worker runs."""

    settings: Settings
    pool: asyncpg.Pool
    registry: CollectorRegistry
    health: HealthState
    stopping: asyncio.Event
    # The worker's one "now" (a soak may simulate it): periods, validation, alert times.
    clock: Callable[[], datetime]


@dataclass(frozen=True)
class ConsumerContext(WorkerContext):
    """A consumer's context: the shell's, plus its Kafka producer and consumer metrics."""

    producer: AIOKafkaProducer
    metrics: ConsumerMetrics


# Work that lives beside the batch loop (an outbox relay, a policy watcher). It runs until
# `context.stopping` is set; returning or raising before that stops the whole worker.
SideTask = Callable[[ConsumerContext], Awaitable[None]]


@dataclass(frozen=True)
class ConsumerSpec:
    """One consumer: what it reads, as which group, how it lands batches, and what else runs."""

    name: str
    topic: str
    group_id: str
    make_handler: Callable[[ConsumerContext], BatchHandler]
    # Where rejected records go; None for a consumer that never rejects (a refused row then
    # stops it until fixed instead).
    dead_letter_topic: str | None = None
    # Refuse to start against a database that is not ready for this consumer (e.g. unmigrated).
    check_database: Callable[[asyncpg.Pool], Awaitable[None]] | None = None
    side_tasks: Sequence[SideTask] = field(default_factory=tuple)
    # Records a batch holds at most; None: CONSUMER_MAX_BATCH.
    max_batch: int | None = None
