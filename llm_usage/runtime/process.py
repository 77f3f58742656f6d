"""One process shell for every worker: signals set a stopping event, probes serve, one pool and
one clock, side tasks watched beside the main work, and a stop in order. The consumers run in it
through `run_consumer`; the rollup schedule is a side task of it (`serve api` keeps uvicorn's)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from llm_usage.core.clock import worker_clock
from llm_usage.core.errors import PipelineError
from llm_usage.core.settings import Settings
from llm_usage.kafka.clients import (
    new_consumer,
    new_producer,
    require_topics,
    start_client,
)
from llm_usage.runtime.dead_letters import KafkaDeadLetterSink
from llm_usage.runtime.handler import ConsumerContext, ConsumerSpec, WorkerContext
from llm_usage.runtime.loop import BatchConsumer, LoopOptions
from llm_usage.runtime.metrics import ConsumerMetrics
from llm_usage.runtime.probes import HealthState, serve_probes
from llm_usage.storage.pool import create_pool

log = structlog.get_logger(__name__)

T = TypeVar("T")
C = TypeVar("C", bound=WorkerContext)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Leaving the group and flushing are bounded: a broker that does not answer must not keep a
# pod past its termination grace period.
_CLIENT_STOP_SECONDS = 10.0
_SIDE_TASK_STOP_SECONDS = 10.0

# Collect the youngest generation after this many net allocations instead of Python's 700.
YOUNG_GENERATION_THRESHOLD = 50_000


class WorkerFailedError(PipelineError):
    """A side task of a worker died; the worker stopped in order because of it."""


def tune_collector_for_batches() -> None:
    """A consumer allocates a few dozen objects per event and frees them all once the batch
    has landed. With Python's defaults the youngest generation is collected every ~30 events,
    so a batch in hand survives into the older generations, and their collections rescan every
    object start-up built (modules, clients). Start-up's objects are frozen out of every future
    collection, and the youngest generation is collected a thousand times less often; cycles
    are still collected, only later, and reference counting frees everything else at once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])


@contextlib.asynccontextmanager
async def worker_process(
    settings: Settings, *, registry: CollectorRegistry, health: HealthState, pool_size: int
) -> AsyncIterator[WorkerContext]:
    """Probes on METRICS_PORT, SIGTERM/SIGINT setting `stopping`, a pool and the worker's clock,
    for as long as the block runs; then the pool closes, the signals go back, the probes stop."""
    clock = worker_clock()
    probes = serve_probes(port=settings.metrics_port, registry=registry, state=health)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in _SIGNALS:
        loop.add_signal_handler(signum, stopping.set)
    try:
        pool = await create_pool(settings.database_url, size=pool_size)
        try:
            yield WorkerContext(
                settings=settings,
                pool=pool,
                registry=registry,
                health=health,
                stopping=stopping,
                clock=clock,
            )
        finally:
            await pool.close()
    finally:
        for signum in _SIGNALS:
            loop.remove_signal_handler(signum)
        probes.close()


async def run_beside(
    main: Coroutine[Any, Any, T],
    side_tasks: Sequence[Callable[[C], Awaitable[None]]],
    context: C,
    *,
    worker: str,
) -> T:
    """Run `main` with the side tasks beside it, and return what it returns.

    A side task that raises, or returns before `stopping` is set, stops the worker: one line
    is logged, `main` finishes in order, and WorkerFailedError says why. The side tasks stop
    after `main` has (they are cancelled if they take longer than 10 s).
    """
    main_task = asyncio.create_task(main, name=f"{worker} main")
    sides = {
        asyncio.create_task(_run_side_task(task, context), name=getattr(task, "__name__", "side"))
        for task in side_tasks
    }
    failed: BaseException | None = None
    try:
        done, _ = await asyncio.wait({main_task, *sides}, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {main_task}:
            error = task.exception()  # a side task that returned did so because of shutdown
            if error is None or failed is not None:
                continue
            failed = error
            log.error(
                "A side task stopped; stopping the worker.",
                worker=worker,
                task=task.get_name(),
                error=f"{type(error).__name__}: {error}",
            )
        context.stopping.set()
        result = await main_task
    finally:
        context.stopping.set()
        await _stop_side_tasks(sides)
    if failed is not None:
        raise WorkerFailedError(
            f"the {worker} stopped because a side task failed: {type(failed).__name__}: {failed}"
        ) from failed
    return result


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
    async with worker_process(
        settings, registry=registry, health=HealthState(), pool_size=settings.database_pool_size
    ) as process:
        if spec.check_database is not None:
            await spec.check_database(process.pool)
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
                    pool=process.pool,
                    registry=registry,
                    health=process.health,
                    stopping=process.stopping,
                    clock=process.clock,
                    producer=producer,
                    metrics=ConsumerMetrics.create(registry),
                )
                return await _consume(spec, consumer, context, exit_when_idle=exit_when_idle)
            finally:
                await _stop_client(producer, "producer")
        finally:
            await _stop_client(consumer, "consumer")  # leaves the group: partitions move on


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
        clock=context.clock,
    )
    consumer.subscribe([spec.topic], listener=batch_consumer.listener)
    log.info("Consumer started.", consumer=spec.name, topic=spec.topic, group_id=spec.group_id)
    # Lands or abandons the batch in hand and commits what landed before side tasks stop.
    await run_beside(batch_consumer.run(), spec.side_tasks, context, worker=f"{spec.name} consumer")
    log.info("Consumer stopped.", consumer=spec.name, **dict(batch_consumer.totals))
    return batch_consumer


async def _run_side_task(task: Callable[[C], Awaitable[None]], context: C) -> None:
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
        log.warning("A Kafka client did not stop in time; exiting anyway.", client=what)
    except Exception as error:  # noqa: BLE001 - already shutting down; nothing left to lose
        log.warning(
            "A Kafka client stopped with an error.", client=what, error=type(error).__name__
        )


def _max_batch(spec: ConsumerSpec, settings: Settings) -> int:
    return settings.consumer_max_batch if spec.max_batch is None else spec.max_batch
