"""Running one consumer process: clients, pool, probes, signals, side tasks, and a shutdown in
order. Every consumer (usage, budget) is a ConsumerSpec run by `run_consumer`."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from llm_usage.core.errors import PipelineError
from llm_usage.core.settings import Settings
from llm_usage.kafka.clients import (
    new_consumer,
    new_producer,
    require_topics,
    start_client,
)
from llm_usage.runtime.dead_letters import KafkaDeadLetterSink
from llm_usage.runtime.loop import BatchConsumer, LoopOptions
from llm_usage.runtime.metrics import ConsumerMetrics
from llm_usage.runtime.probes import HealthState, serve_probes
from llm_usage.runtime.spec import ConsumerContext, ConsumerSpec, SideTask
from llm_usage.storage.pool import create_pool

log = structlog.get_logger(__name__)

# Leaving the group and flushing are bounded: a broker that does not answer must not keep a
# pod past its termination grace period.
_CLIENT_STOP_SECONDS = 10.0
_SIDE_TASK_STOP_SECONDS = 10.0


class WorkerFailedError(PipelineError):
    """A side task of a worker died; the worker stopped in order because of it."""


async def run_consumer(
    settings: Settings,
    spec: ConsumerSpec,
    *,
    exit_when_idle: float | None = None,
    registry: CollectorRegistry | None = None,
) -> BatchConsumer:
    """Run `spec` until SIGTERM/SIGINT (or idle); return the loop so callers can read totals.

    Shutdown: the batch in hand lands or is abandoned, landed offsets are committed, side tasks
    stop, the group is left, the producer flushed, the pool closed — in that order.
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
            if spec.check_database is not None:
                await spec.check_database(pool)
            consumer = new_consumer(
                settings, group_id=spec.group_id, max_batch=_max_batch(spec, settings)
            )
            await start_client(consumer, settings)
            try:
                topics = [spec.topic, *([spec.dead_letter_topic] if spec.dead_letter_topic else [])]
                await require_topics(consumer, topics)
                producer = new_producer(settings)
                await start_client(producer, settings)
                try:
                    context = ConsumerContext(
                        settings=settings,
                        pool=pool,
                        producer=producer,
                        metrics=ConsumerMetrics.create(registry),
                        registry=registry,
                        health=health,
                        stopping=stopping,
                    )
                    return await _consume(spec, consumer, context, exit_when_idle=exit_when_idle)
                finally:
                    await _stop_client(producer, "producer")
            finally:
                await _stop_client(consumer, "consumer")  # leaves the group: partitions move on
        finally:
            await pool.close()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        probes.close()


async def _consume(
    spec: ConsumerSpec,
    consumer: AIOKafkaConsumer,
    context: ConsumerContext,
    *,
    exit_when_idle: float | None,
) -> BatchConsumer:
    settings = context.settings
    sink = (
        KafkaDeadLetterSink(context.producer, spec.dead_letter_topic)
        if spec.dead_letter_topic
        else None
    )
    batch_consumer = BatchConsumer(
        name=spec.name,
        consumer=consumer,
        handler=spec.make_handler(context),
        dead_letters=sink,
        metrics=context.metrics,
        health=context.health,
        stopping=context.stopping,
        options=LoopOptions(
            max_batch=_max_batch(spec, settings),
            poll_timeout_ms=settings.consumer_poll_timeout_ms,
            retry_seconds=settings.batch_retry_seconds,
            revoke_wait_seconds=settings.consumer_revoke_wait_seconds,
            exit_when_idle=exit_when_idle,
        ),
    )
    consumer.subscribe([spec.topic], listener=batch_consumer.listener)
    log.info("Consumer started.", consumer=spec.name, topic=spec.topic, group_id=spec.group_id)
    main = asyncio.create_task(batch_consumer.run(), name=f"{spec.name}-loop")
    sides = {
        asyncio.create_task(_run_side_task(task, context), name=getattr(task, "__name__", "side"))
        for task in spec.side_tasks
    }
    failed: BaseException | None = None
    try:
        done, _ = await asyncio.wait({main, *sides}, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {main}:
            failed = task.exception()  # a side task that returned did so because of shutdown
            if failed is None:
                continue
            log.error(
                "A side task stopped; stopping the worker.",
                consumer=spec.name,
                task=task.get_name(),
                error=f"{type(failed).__name__}: {failed}",
            )
        context.stopping.set()
        await main  # lands or abandons the batch in hand, commits what landed
    finally:
        context.stopping.set()
        await _stop_side_tasks(sides)
    if failed is not None:
        raise WorkerFailedError(
            f"the {spec.name} consumer stopped because a side task failed: "
            f"{type(failed).__name__}: {failed}"
        ) from failed
    log.info("Consumer stopped.", consumer=spec.name, **dict(batch_consumer.totals))
    return batch_consumer


async def _run_side_task(task: SideTask, context: ConsumerContext) -> None:
    await task(context)
    if not context.stopping.is_set():
        raise WorkerFailedError("returned before the worker was asked to stop")


async def _stop_side_tasks(sides: set[asyncio.Task[None]]) -> None:
    if not sides:
        return
    _, pending = await asyncio.wait(sides, timeout=_SIDE_TASK_STOP_SECONDS)
    for task in pending:
        task.cancel()
    for task in sides:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def _stop_client(client: AIOKafkaConsumer | AIOKafkaProducer, what: str) -> None:
    try:
        await asyncio.wait_for(client.stop(), _CLIENT_STOP_SECONDS)
    except TimeoutError:
        log.warning(f"Kafka {what} did not stop in time; exiting anyway.")
    except Exception as error:  # noqa: BLE001 - already shutting down; nothing left to lose
        log.warning(f"Kafka {what} stopped with an error.", error=f"{type(error).__name__}")


def _max_batch(spec: ConsumerSpec, settings: Settings) -> int:
    return settings.consumer_max_batch if spec.max_batch is None else spec.max_batch
