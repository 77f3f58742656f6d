"""One process shell for every worker: signals set a stopping event, probes serve, one pool and
one clock, side tasks watched beside the main work, and a stop in order. The consumers run in it
through `run_consumer`; the rollup schedule is a side task of it (`serve api` keeps uvicorn's)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from llm_usage.core.clock import worker_clock
from llm_usage.core.errors import PipelineError
from llm_usage.core.settings import Settings
from llm_usage.kafka.authorization import require_permissions
from llm_usage.kafka.clients import (
    new_consumer,
    new_producer,
    require_topics,
    start_client,
)
from llm_usage.kafka.permissions import Worker
from llm_usage.runtime.dead_letters import KafkaDeadLetterSink
from llm_usage.runtime.handler import ConsumerContext, ConsumerSpec, WorkerContext
from llm_usage.runtime.loop import BatchConsumer, LoopOptions
from llm_usage.runtime.metrics import ConsumerMetrics
from llm_usage.runtime.probes import HealthState, keep_heartbeat, serve_probes
from llm_usage.storage.pool import create_pool

log = structlog.get_logger(__name__)

T = TypeVar("T")
C = TypeVar("C", bound=WorkerContext)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# One deadline for the whole stop (SHUTDOWN_TIMEOUT_SECONDS, measured from the signal): each
# step ends by its share of it, whatever Kafka or PostgreSQL does, so that the steps after it
# still get their turn. The batch in hand lands (or is abandoned) by 40 %; the landed offsets
# are committed, and the side tasks stop, by 65 %; the producer is flushed by 78 %, the group
# left by 88 %; the pool is closed gracefully by 96 %, or terminated; the rest is the exit.
_BATCH_IN_HAND_SHARE = 0.4
_MAIN_WORK_SHARE = 0.65
_PRODUCER_STOP_SHARE = 0.78
_CONSUMER_STOP_SHARE = 0.88
_POOL_CLOSE_SHARE = 0.96
# No step takes longer than this even when the deadline would allow it.
_CLIENT_STOP_SECONDS = 10.0
_BATCH_IN_HAND_SECONDS = 10.0

# Collect the youngest generation after this many net allocations instead of Python's 700.
YOUNG_GENERATION_THRESHOLD = 50_000


class WorkerFailedError(PipelineError):
    """A side task of a worker died; the worker stopped in order because of it."""


class Stopping(asyncio.Event):
    """The worker's stopping event. It remembers when it was first set (the signal, a side
    task's failure, or the main work's end), and every step of the stop takes its share of one
    deadline measured from then."""

    def __init__(self, deadline_seconds: float) -> None:
        super().__init__()
        self.deadline_seconds = deadline_seconds
        self._set_at: float | None = None

    def set(self) -> None:
        if self._set_at is None:
            self._set_at = time.monotonic()
        super().set()

    def seconds_left(self, share: float = 1.0) -> float:
        """Seconds until `share` of the deadline has passed since the stop began (measured
        from now if it has not begun); never negative."""
        began = self._set_at if self._set_at is not None else time.monotonic()
        return max(0.0, began + share * self.deadline_seconds - time.monotonic())


def seconds_left(stopping: asyncio.Event, share: float, *, otherwise: float) -> float:
    """`stopping.seconds_left(share)` for the process shell's event; `otherwise` for a plain one."""
    if isinstance(stopping, Stopping):
        return stopping.seconds_left(share)
    return otherwise


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
    """Probes on METRICS_PORT (liveness: the event loop's heartbeat), SIGTERM/SIGINT setting
    `stopping`, a pool and the worker's clock, for as long as the block runs; then the pool
    closes (terminated if the stop's deadline has passed), the signals go back, the probes stop."""
    clock = worker_clock()
    probes = serve_probes(port=settings.metrics_port, registry=registry, state=health)
    heartbeat = asyncio.create_task(keep_heartbeat(health), name="heartbeat")
    stopping = Stopping(settings.shutdown_timeout_seconds)
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
            stopping.set()
            await _close_pool(pool, stopping)
    finally:
        for signum in _SIGNALS:
            loop.remove_signal_handler(signum)
        heartbeat.cancel()
        probes.close()


async def _close_pool(pool: asyncpg.Pool, stopping: Stopping) -> None:
    """Close the pool gracefully while the deadline allows, then terminate what is left (a
    connection stuck in a query: the server rolls its transaction back)."""
    try:
        await asyncio.wait_for(pool.close(), stopping.seconds_left(_POOL_CLOSE_SHARE))
    except TimeoutError:
        log.warning(
            "The database pool did not close within the shutdown deadline; terminated.",
            deadline_seconds=stopping.deadline_seconds,
        )
        pool.terminate()


async def run_beside(
    main: Coroutine[Any, Any, T],
    side_tasks: Sequence[Callable[[C], Awaitable[None]]],
    context: C,
    *,
    worker: str,
) -> T | None:
    """Run `main` with the side tasks beside it, and return what it returns.

    A side task that raises, or returns before `stopping` is set, stops the worker: one line
    is logged, `main` finishes in order, and WorkerFailedError says why. The side tasks stop
    after `main` has. Both get until 65 % of the stop's deadline (SHUTDOWN_TIMEOUT_SECONDS),
    then they are cancelled: `main` then returns None (a consumer's batch in hand or its
    commit is abandoned: nothing is committed that has not landed).
    """
    main_task = asyncio.create_task(main, name=f"{worker} main")
    sides = {
        asyncio.create_task(_run_side_task(task, context), name=getattr(task, "__name__", "side"))
        for task in side_tasks
    }
    failed: BaseException | None = None
    stop = asyncio.create_task(context.stopping.wait(), name="stop")
    try:
        # The deadline runs from the stop: waiting for `main` begins there, not when it returns.
        done, _ = await asyncio.wait({main_task, stop, *sides}, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {main_task, stop}:
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
        result = await _finish_main(main_task, context.stopping, worker=worker)
    finally:
        stop.cancel()
        context.stopping.set()
        await _stop_side_tasks(sides, context.stopping)
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
    pool_size: int | None = None,
) -> BatchConsumer:
    """Run `spec` until SIGTERM/SIGINT (or idle); return the loop so callers can read totals.

    Shutdown: the batch in hand lands or is abandoned, landed offsets are committed, side tasks
    stop, the producer is flushed, the group left, the pool closed — in that order, all within
    SHUTDOWN_TIMEOUT_SECONDS of the signal (each step by its share of it).
    """
    registry = registry or CollectorRegistry()
    size = settings.database_pool_size if pool_size is None else pool_size
    async with worker_process(
        settings, registry=registry, health=HealthState(), pool_size=size
    ) as process:
        if spec.check_database is not None:
            await spec.check_database(process.pool)
        consumer = new_consumer(
            settings, group_id=spec.group_id, max_batch=_max_batch(spec, settings)
        )
        await start_client(consumer, settings)
        try:
            # Every ACL of the worker's table, before a denied Describe looks like a missing
            # topic and a denied DLQ Write stalls a partition weeks later.
            await require_permissions(settings, Worker(spec.name))
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
                await _stop_client(producer, "producer", process.stopping, _PRODUCER_STOP_SHARE)
        finally:
            # A dynamic member leaves the group and its partitions move on at once; a static one
            # (KAFKA_GROUP_INSTANCE_ID) does not, and takes them back when it returns.
            await _stop_client(consumer, "consumer", process.stopping, _CONSUMER_STOP_SHARE)


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
            shutdown_grace_seconds=min(
                _BATCH_IN_HAND_SECONDS, _BATCH_IN_HAND_SHARE * settings.shutdown_timeout_seconds
            ),
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


async def _finish_main(
    main_task: asyncio.Task[T], stopping: asyncio.Event, *, worker: str
) -> T | None:
    """What `main` returns once it has stopped; None if it had to be cancelled at its share of
    the deadline (it raises what `main` raised)."""
    left = seconds_left(stopping, _MAIN_WORK_SHARE, otherwise=float("inf"))
    done, _ = await asyncio.wait({main_task}, timeout=None if left == float("inf") else left)
    if done:
        return main_task.result()
    log.warning(
        "The main work did not stop within its share of the shutdown deadline; abandoned "
        "(what had not landed is read again by the next owner).",
        worker=worker,
    )
    await _cancel_within({main_task})
    return None


async def _cancel_within(tasks: set[asyncio.Task[Any]], seconds: float = 1.0) -> None:
    """Cancel `tasks` and give them `seconds` in all to unwind; their outcomes are dropped."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=seconds)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: an error while unwinding is not worth a second line


async def _stop_side_tasks(sides: set[asyncio.Task[None]], stopping: asyncio.Event) -> None:
    if not sides:
        return
    left = seconds_left(stopping, _MAIN_WORK_SHARE, otherwise=_CLIENT_STOP_SECONDS)
    _, pending = await asyncio.wait(sides, timeout=left)
    if pending:
        await _cancel_within(pending)
    for task in sides - pending:
        if not task.cancelled():
            task.exception()  # logged by run_beside when it mattered


async def _stop_client(
    client: AIOKafkaConsumer | AIOKafkaProducer, what: str, stopping: asyncio.Event, share: float
) -> None:
    left = seconds_left(stopping, share, otherwise=_CLIENT_STOP_SECONDS)
    try:
        await asyncio.wait_for(client.stop(), max(0.1, min(_CLIENT_STOP_SECONDS, left)))
    except TimeoutError:
        log.warning("A Kafka client did not stop in time; exiting anyway.", client=what)
    except Exception as error:  # noqa: BLE001 - already shutting down; nothing left to lose
        log.warning(
            "A Kafka client stopped with an error.", client=what, error=type(error).__name__
        )


def _max_batch(spec: ConsumerSpec, settings: Settings) -> int:
    return settings.consumer_max_batch if spec.max_batch is None else spec.max_batch
