"""`llm-usage bench ingest`: the usage consumer next to two baselines measured in the same run.

(a) the usage consumer end to end: first fetch to last commit, every event in Postgres;
(b) the naive service: per event, an existence check and an insert in their own transaction;
(c) the database ceiling: the same rows COPYed straight into the same table, no Kafka.
"""

from __future__ import annotations

import asyncio
import os
import platform
import random
import time
import uuid
from datetime import UTC, datetime

import asyncpg

from llm_usage.cli.bench_support import (
    Measurement,
    bench_database,
    freeze_harness_objects,
    publish_backlog,
    time_consumer,
)
from llm_usage.cli.local_run import settings_for_local_run
from llm_usage.cli.sample_events import sample_stream
from llm_usage.consumers.usage import usage_consumer_spec
from llm_usage.core.logs import configure_logging
from llm_usage.core.settings import Settings
from llm_usage.deploy.topics import ensure_topics
from llm_usage.schemas.dead_letter import Rejection
from llm_usage.schemas.decoding import decode_usage_event
from llm_usage.schemas.usage_event import UsageEvent
from llm_usage.storage.migrate import migrate
from llm_usage.storage.usage_events import USAGE_EVENT_COLUMNS, usage_event_row

BENCH_DATABASE = "llm_usage_bench"
_NAIVE_INSERT = (
    f"INSERT INTO llm_usage_events ({', '.join(USAGE_EVENT_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(USAGE_EVENT_COLUMNS) + 1))})"
)


async def run_ingest_benchmark(*, events: int, dup_rate: float, naive_events: int) -> None:
    """Measure (a), (b) and (c) on the same machine, database and data; print the ratios."""
    configure_logging(log_format="console", level="WARNING")
    settings = await asyncio.to_thread(settings_for_local_run)
    database_url = await bench_database(settings.database_url, BENCH_DATABASE)
    run_id = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    stream = sample_stream(
        random.Random(run_id), count=events, dup_rate=dup_rate, id_prefix=f"bench-{run_id}", now=now
    )
    unique_events = _unique_events([value for _, value, _ in stream], now=now)
    print(
        f"{events} events ({len(unique_events)} unique, dup rate {dup_rate}); "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=settings.database_pool_size)
    assert pool is not None
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
            print(f"PostgreSQL {await connection.fetchval('SHOW server_version')}")
        consumer = await _measure_consumer(settings, database_url, run_id, stream, pool)
        await _verify_stored(pool, len(unique_events))
        ceiling = await _measure_copy(pool, unique_events)
        naive = await _measure_naive(pool, [value for _, value, _ in stream[:naive_events]], now)
    finally:
        await pool.close()

    print()
    for measured in (consumer, naive, ceiling):
        print(
            f"{measured.name:<48}{measured.events:>9} events {measured.seconds:>8.2f} s "
            f"{measured.rate:>10,.0f} events/s"
        )
    print(f"\na/c = {consumer.rate / ceiling.rate:.2f}   (target >= 0.5)")
    print(f"a/b = {consumer.rate / naive.rate:.1f}   (target >= 20)")


def _unique_events(values: list[bytes], *, now: datetime) -> list[UsageEvent]:
    seen: dict[str, UsageEvent] = {}
    for value in values:
        decoded = decode_usage_event(value, now=now)
        assert not isinstance(decoded, Rejection), decoded
        seen.setdefault(decoded.gateway_request_id, decoded)
    return list(seen.values())


async def _measure_consumer(
    settings: Settings,
    database_url: str,
    run_id: str,
    stream: list[tuple[bytes, bytes, dict[str, object]]],
    pool: asyncpg.Pool,
) -> Measurement:
    bench = settings.model_copy(
        update={
            "database_url": database_url,
            "usage_topic": f"bench-{run_id}.usage",
            "dlq_topic": f"bench-{run_id}.usage.dlq",
            "usage_group_id": f"bench-{run_id}",
            "metrics_port": 0,
        }
    )
    await ensure_topics(bench, [bench.usage_topic, bench.dlq_topic], partitions=6)
    seconds = await publish_backlog(bench, bench.usage_topic, [(k, v) for k, v, _ in stream])
    print(f"published {len(stream)} events in {seconds:.1f} s (not timed)")
    await pool.execute("TRUNCATE llm_usage_events")
    freeze_harness_objects()
    run = await time_consumer(bench, usage_consumer_spec(bench))
    print(
        f"consumer CPU {run.cpu_seconds:.1f} s (whole run, with start and idle "
        f"exit) for {run.seconds:.1f} s from first fetch to last commit"
    )
    return Measurement("(a) usage consumer, Kafka to Postgres", len(stream), run.seconds)


async def _verify_stored(pool: asyncpg.Pool, expected: int) -> None:
    stored = await pool.fetchval("SELECT count(*) FROM llm_usage_events")
    if stored != expected:
        raise AssertionError(f"the consumer stored {stored} rows, expected {expected}")


async def _measure_copy(pool: asyncpg.Pool, events: list[UsageEvent]) -> Measurement:
    rows = [usage_event_row(event) for event in events]
    await pool.execute("TRUNCATE llm_usage_events")
    async with pool.acquire() as connection:
        started = time.perf_counter()
        await connection.copy_records_to_table(
            "llm_usage_events", records=rows, columns=list(USAGE_EVENT_COLUMNS)
        )
        seconds = time.perf_counter() - started
    return Measurement("(c) ceiling: COPY into the table, no Kafka", len(rows), seconds)


async def _measure_naive(pool: asyncpg.Pool, values: list[bytes], now: datetime) -> Measurement:
    await pool.execute("TRUNCATE llm_usage_events")
    async with pool.acquire() as connection:
        started = time.perf_counter()
        for value in values:
            event = decode_usage_event(value, now=now)
            assert not isinstance(event, Rejection)
            async with connection.transaction():
                known = await connection.fetchval(
                    "SELECT 1 FROM llm_usage_events WHERE gateway_request_id = $1",
                    event.gateway_request_id,
                )
                if not known:
                    await connection.execute(_NAIVE_INSERT, *usage_event_row(event))
        seconds = time.perf_counter() - started
    return Measurement("(b) naive: check + insert per event, no Kafka", len(values), seconds)
