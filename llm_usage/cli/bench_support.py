"""Pieces every `llm-usage bench` command shares: a database of its own, a backlog published
before the clock starts, and a consumer timed from its first fetch to its last commit."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from prometheus_client import CollectorRegistry

from llm_usage.consumers.runtime.kafka_clients import new_producer, start_client
from llm_usage.consumers.runtime.spec import ConsumerSpec
from llm_usage.consumers.runtime.worker import run_consumer
from llm_usage.core.settings import Settings


@dataclass(frozen=True)
class Measurement:
    name: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


@dataclass(frozen=True)
class TimedRun:
    """A consumer's busy time (first fetch to last commit) and its process's CPU for the run."""

    seconds: float
    cpu_seconds: float


async def bench_database(database_url: str, name: str) -> str:
    """A database of its own on the same server, so a benchmark never touches real usage."""
    parts = urlsplit(database_url)
    bench_url = urlunsplit(parts._replace(path=f"/{name}"))
    connection = await asyncpg.connect(database_url)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return bench_url


async def publish_backlog(
    settings: Settings, topic: str, records: Sequence[tuple[bytes, bytes]]
) -> float:
    """Publish (key, value) records as fast as the producer goes; return the seconds it took."""
    producer = new_producer(settings, linger_ms=20, max_batch_size=256 * 1024)
    await start_client(producer, settings)
    started = time.perf_counter()
    try:
        sent = [await producer.send(topic, key=key, value=value) for key, value in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return time.perf_counter() - started


def freeze_harness_objects() -> None:
    """The harness holds every event for its checks; a real consumer process holds one batch.
    Freezing them keeps the garbage collector from rescanning them while a consumer is timed."""
    gc.collect()
    gc.freeze()


async def time_consumer(settings: Settings, spec: ConsumerSpec) -> TimedRun:
    """Run `spec` in this process until it has been idle for a second; time its busy part."""
    cpu_before = time.process_time()
    consumer = await run_consumer(settings, spec, exit_when_idle=1.0, registry=CollectorRegistry())
    if consumer.first_fetch_at is None or consumer.last_commit_at is None:
        raise AssertionError(f"the {spec.name} consumer fetched nothing from {spec.topic}")
    return TimedRun(
        seconds=consumer.last_commit_at - consumer.first_fetch_at,
        cpu_seconds=time.process_time() - cpu_before,
    )
