"""Wiring one consumer process: clients, pool, probes, signals, and a shutdown in order."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

import asyncpg
import structlog
from prometheus_client import CollectorRegistry

from llm_usage.consumers.runtime.health import HealthState, serve_probes
from llm_usage.consumers.runtime.kafka_clients import (
    new_consumer,
    new_producer,
    require_topics,
    start_client,
)
from llm_usage.consumers.runtime.loop import BatchConsumer, BatchHandler, LoopOptions
from llm_usage.consumers.runtime.metrics import ConsumerMetrics
from llm_usage.core.settings import Settings
from llm_usage.storage.pool import create_pool

log = structlog.get_logger(__name__)


async def run_consumer(
    settings: Settings,
    *,
    name: str,
    topic: str,
    group_id: str,
    make_handler: Callable[[asyncpg.Pool], BatchHandler],
    check_database: Callable[[asyncpg.Pool], Awaitable[None]] | None = None,
    exit_when_idle: float | None = None,
    registry: CollectorRegistry | None = None,
) -> BatchConsumer:
    """Run a consumer until SIGTERM/SIGINT (or idle); return it so callers can read its totals.

    Shutdown: the batch in hand lands or is abandoned, landed offsets are committed, the group
    is left, the producer flushed, the pool closed — in that order.
    """
    registry = registry or CollectorRegistry()
    health = HealthState()
    probes = serve_probes(port=settings.metrics_port, registry=registry, state=health)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        pool = await create_pool(settings.database_url, size=settings.database_pool_size)
        try:
            if check_database is not None:
                await check_database(pool)
            return await _consume(
                settings,
                name=name,
                topic=topic,
                group_id=group_id,
                handler=make_handler(pool),
                registry=registry,
                health=health,
                stopping=stopping,
                exit_when_idle=exit_when_idle,
            )
        finally:
            await pool.close()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        probes.close()


async def _consume(
    settings: Settings,
    *,
    name: str,
    topic: str,
    group_id: str,
    handler: BatchHandler,
    registry: CollectorRegistry,
    health: HealthState,
    stopping: asyncio.Event,
    exit_when_idle: float | None,
) -> BatchConsumer:
    consumer = new_consumer(settings, group_id=group_id, max_batch=settings.consumer_max_batch)
    await start_client(consumer, settings)
    try:
        await require_topics(consumer, [topic, settings.dlq_topic])
        producer = new_producer(settings)
        await start_client(producer, settings)
        try:
            batch_consumer = BatchConsumer(
                name=name,
                consumer=consumer,
                producer=producer,
                handler=handler,
                dlq_topic=settings.dlq_topic,
                metrics=ConsumerMetrics.create(registry),
                health=health,
                stopping=stopping,
                options=LoopOptions(
                    max_batch=settings.consumer_max_batch,
                    poll_timeout_ms=settings.consumer_poll_timeout_ms,
                    retry_seconds=settings.batch_retry_seconds,
                    exit_when_idle=exit_when_idle,
                ),
            )
            consumer.subscribe([topic], listener=batch_consumer)
            log.info("Consumer started.", consumer=name, topic=topic, group_id=group_id)
            await batch_consumer.run()
            log.info("Consumer stopped.", consumer=name, **dict(batch_consumer.totals))
            return batch_consumer
        finally:
            with contextlib.suppress(Exception):  # already shutting down; nothing left to lose
                await producer.stop()
    finally:
        await consumer.stop()  # leaves the group so the partitions move on at once
