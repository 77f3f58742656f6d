"""How a consumer describes itself to the runtime, and what its handler is built from."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from llm_usage.core.settings import Settings
from llm_usage.runtime.metrics import ConsumerMetrics
from llm_usage.runtime.outcome import BatchHandler
from llm_usage.runtime.probes import HealthState


@dataclass(frozen=True)
class ConsumerContext:
    """Built once at start-up and handed to the handler factory and to every side task."""

    settings: Settings
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    metrics: ConsumerMetrics
    registry: CollectorRegistry
    health: HealthState
    stopping: asyncio.Event


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
