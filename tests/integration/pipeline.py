"""Helpers for integration tests: unique topics, producing events, reading the DLQ and the table."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from llm_usage.core.settings import Settings
from llm_usage.domain.money import usd_to_cents
from llm_usage.kafka.topics import ensure_topics
from llm_usage.rollup.reconcile import reconcile
from llm_usage.testing.processes import spawn_llm_usage
from llm_usage.testing.topics import end_offsets
from tests import clock


class RestartablePostgres(Protocol):
    """What the session's `postgres` fixture offers to tests that restart the database."""

    can_restart: bool

    def restart(self) -> None: ...


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def usage_event(tenant_id: str, **fields: Any) -> dict[str, Any]:
    """A valid v1 usage event for `tenant_id`, which occurred earlier today (the tests' now);
    `fields` override or add to it."""
    event: dict[str, Any] = {
        "event_type": "llm_usage_recorded",
        "schema_version": 1,
        "gateway_request_id": unique("req"),
        "tenant_id": tenant_id,
        "deployment_id": "dep-1",
        "user_id": "user-1",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_tokens": 1200,
        "output_tokens": 300,
        "customer_charge_usd": "0.0054",
        "markup_mode": "flat_percent",
        "occurred_at": clock.iso(clock.earlier_today()),
    }
    event.update(fields)
    # The gateway's own rounding, as it would send it, unless the test says otherwise.
    event.setdefault("customer_charge_cents", usd_to_cents(Decimal(event["customer_charge_usd"])))
    return event


def unpriced_event(tenant: str, provider: str, model: str, **fields: Any) -> dict[str, Any]:
    """A usage event without a charge: the consumers price it from the price table."""
    event = usage_event(tenant, provider=provider, model=model, **fields)
    del event["customer_charge_usd"], event["customer_charge_cents"]
    return event


async def add_price(
    pool: asyncpg.Pool,
    provider: str,
    model: str,
    *,
    effective_from: datetime,
    created_at: datetime,
    input: str,
    output: str,
    cached_input: str | None = None,
    reasoning: str | None = None,
    fee: str = "0",
) -> None:
    """A price row as if added at `created_at` (a backdated one: storage refuses those)."""
    await pool.execute(
        "INSERT INTO prices (provider, model, effective_from, input, cached_input, output, "
        "reasoning, request_fee_usd, created_at, created_by) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'test')",
        provider,
        model,
        effective_from,
        Decimal(input),
        Decimal(cached_input or input),
        Decimal(output),
        Decimal(reasoning or output),
        Decimal(fee),
        created_at,
    )


def encode(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event).encode()


@dataclass(frozen=True)
class PipelineTopics:
    """One test's own topics and consumer group, and Settings that point at them."""

    settings: Settings

    @property
    def usage(self) -> str:
        return self.settings.usage_topic

    @property
    def dlq(self) -> str:
        return self.settings.dlq_topic

    def environment(self) -> dict[str, str]:
        """Environment for a `llm-usage` subprocess that uses these topics."""
        s = self.settings
        return {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": s.kafka_bootstrap_servers,
            "DATABASE_URL": s.database_url,
            "USAGE_TOPIC": s.usage_topic,
            "DLQ_TOPIC": s.dlq_topic,
            "ALERTS_TOPIC": s.alerts_topic,
            "USAGE_GROUP_ID": s.usage_group_id,
            "BUDGET_GROUP_ID": s.budget_group_id,
            "METRICS_PORT": "0",
            "LOG_FORMAT": "json",
            "CONSUMER_MAX_BATCH": str(s.consumer_max_batch),
            "CONSUMER_POLL_TIMEOUT_MS": str(s.consumer_poll_timeout_ms),
            "BATCH_RETRY_SECONDS": str(s.batch_retry_seconds),
            "CONSUMER_REVOKE_WAIT_SECONDS": str(s.consumer_revoke_wait_seconds),
        }


async def create_pipeline_topics(
    *,
    bootstrap_servers: str,
    database_url: str,
    partitions: int = 3,
    replication_factor: int = 1,
    **settings: Any,
) -> PipelineTopics:
    base = unique("it")
    topics = PipelineTopics(
        Settings(
            kafka_bootstrap_servers=bootstrap_servers,
            database_url=database_url,
            usage_topic=f"{base}.usage",
            dlq_topic=f"{base}.usage.dlq",
            alerts_topic=f"{base}.alerts",
            usage_group_id=f"{base}.group",
            budget_group_id=f"{base}.budget",
            metrics_port=0,
            log_format="json",
            consumer_poll_timeout_ms=100,
            **settings,
        )
    )
    await ensure_topics(
        topics.settings,
        [topics.usage, topics.dlq],
        partitions=partitions,
        replication_factor=replication_factor,
    )
    return topics


async def produce(
    bootstrap_servers: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None]]
) -> int:
    """Publish (key, value) pairs with an idempotent producer; return how many were sent."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers, enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        sent = [await producer.send(topic, key=key, value=value) for key, value in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return len(sent)


async def read_topic(
    bootstrap_servers: str, topic: str, *, expected: int, within: float = 30
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read a topic from the start until `expected` records arrived (or the deadline passed)."""
    # Without a group, a subscription gets every partition, read from the earliest offset.
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + within
        while len(records) < expected and time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=200)
            records.extend(r for batch in fetched.values() for r in batch)
        return records
    finally:
        await consumer.stop()


async def stored_for(
    pool: asyncpg.Pool, gateway_request_ids: Sequence[str]
) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM llm_usage_events WHERE gateway_request_id = ANY($1::text[])",
        list(gateway_request_ids),
    )


async def tenant_totals(pool: asyncpg.Pool, tenant_id: str) -> tuple[int, Decimal]:
    row = await pool.fetchrow(
        "SELECT count(*) AS n, coalesce(sum(customer_charge_usd), 0) AS total "
        "FROM llm_usage_events WHERE tenant_id = $1",
        tenant_id,
    )
    assert row is not None
    return int(row["n"]), Decimal(row["total"])


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, within: float, message: str
) -> None:
    """Poll `condition` until it holds; fail with `message` at the deadline."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within}s: {message}")


def header(record: ConsumerRecord[bytes, bytes], name: str) -> str:
    for key, value in record.headers:
        if key == name:
            return bytes(value).decode()
    raise KeyError(name)


@dataclass
class RunningConsumer:
    """A `llm-usage consume usage` process whose JSON log lines are collected as they come."""

    process: asyncio.subprocess.Process
    lines: list[str]
    reader: asyncio.Task[None]

    async def finished(self, *, within: float) -> int:
        """Wait for the process to exit by itself; return its exit code."""
        await asyncio.wait_for(self.process.wait(), within)
        await self.reader
        assert self.process.returncode is not None
        return self.process.returncode

    async def killed(self) -> None:
        self.process.kill()
        await self.process.wait()
        await self.reader

    def logged(self, event: str) -> list[dict[str, Any]]:
        """The structured log entries whose message is `event`."""
        found = []
        for line in self.lines:
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == event:
                    found.append(entry)
        return found

    def log_tail(self) -> str:
        return "\n".join(self.lines[-120:])


async def spawn_consumer(
    topics: PipelineTopics,
    *extra_args: str,
    env: Mapping[str, str] | None = None,
    worker: str = "usage",
) -> RunningConsumer:
    """Start `llm-usage consume <worker>` as a real process for these topics."""
    process = await spawn_llm_usage("consume", worker, *extra_args, env=env or topics.environment())
    lines: list[str] = []

    async def collect() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            lines.append(raw.decode(errors="replace").rstrip("\n"))

    running = RunningConsumer(process, lines, asyncio.create_task(collect()))
    SPAWNED.append(running)
    return running


# Every process spawned by a test, so that one a failing test left running is killed after it.
SPAWNED: list[RunningConsumer] = []


async def kill_leftovers() -> None:
    while SPAWNED:
        running = SPAWNED.pop()
        if running.process.returncode is None:
            await running.killed()


# --- Offsets, partitions and database locks, for tests that prove absence without waiting. ---


async def topic_record_count(bootstrap_servers: str, topic: str) -> int:
    """How many records `topic` holds: its end offsets summed (the tests' topics start at 0 and
    are never truncated, and nothing writes them in transactions, so each offset is a record)."""
    return sum((await end_offsets(bootstrap_servers, topic)).values())


async def topic_exists(bootstrap_servers: str, topic: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        return topic in await admin.list_topics()
    finally:
        await admin.close()


async def committed_offsets(bootstrap_servers: str, group_id: str, topic: str) -> dict[int, int]:
    """The offsets `group_id` committed on `topic`, by partition (none: never committed)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
    finally:
        await admin.close()
    return {
        tp.partition: int(meta.offset)
        for tp, meta in offsets.items()
        if tp.topic == topic and meta.offset >= 0
    }


async def produce_to_partitions(
    bootstrap_servers: str,
    topic: str,
    records: Iterable[tuple[int, bytes | None, bytes | None]],
) -> list[tuple[int, int]]:
    """Publish (partition, key, value) triples; return each record's (partition, offset)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers, enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        sent = [
            await producer.send(topic, key=key, value=value, partition=partition)
            for partition, key, value in records
        ]
        delivered = await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return [(int(meta.partition), int(meta.offset)) for meta in delivered]


async def produce_one_record_batch(
    bootstrap_servers: str,
    topic: str,
    partition: int,
    records: Sequence[tuple[bytes | None, bytes | None]],
) -> list[int]:
    """Publish `records` as ONE Kafka record batch on `partition`; return their offsets.

    A record batch is stored, fetched and handed to a consumer whole, so a consumer whose batch
    size is at least len(records) receives all of them in one `getmany`.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, enable_idempotence=True)
    await producer.start()
    try:
        batch = producer.create_batch()
        for key, value in records:
            appended = batch.append(key=key, value=value, timestamp=None)
            assert appended is not None, "the records do not fit in one record batch"
        delivered = await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()
    first = int(delivered.offset)
    return [first + index for index in range(len(records))]


@asynccontextmanager
async def writes_held(database_url: str) -> AsyncIterator[int]:
    """Hold a SHARE lock on the id window and the events until the block ends: reads go on,
    every INSERT or COPY (a consumer writes the window first) waits for the release. Yields the
    holding backend's pid (see `sessions_blocked_by`)."""
    connection: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute("LOCK TABLE usage_event_ids, llm_usage_events IN SHARE MODE")
            yield int(await connection.fetchval("SELECT pg_backend_pid()"))
            # Leaving the block commits a transaction that wrote nothing: the lock is released.
    finally:
        await connection.close()


async def sessions_blocked_by(
    pool: asyncpg.Pool, blocker_pid: int, *, application_name: str | None = "llm-usage"
) -> int:
    """How many sessions (of `application_name`: the consumers' pools) wait for a lock that
    the backend `blocker_pid` holds. On Citus the waits happen on the workers, where
    `pg_blocking_pids` on the coordinator does not see them: `citus_lock_waits` does."""
    if await pool.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'citus'"):
        count = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE ($1 = ANY(pg_blocking_pids(pid)) OR pid IN ("
            # A global pid is the node's id * 10^10 + the pid there.
            "  SELECT w.waiting_gpid - n.base FROM citus_lock_waits AS w,"
            "    (SELECT nodeid * 10000000000::bigint AS base FROM pg_dist_node"
            "     WHERE groupid = 0) AS n"
            "  WHERE w.blocking_gpid = n.base + $1"
            "    AND w.waiting_gpid BETWEEN n.base AND n.base + 9999999999)) "
            "AND ($2::text IS NULL OR application_name = $2::text)",
            blocker_pid,
            application_name,
        )
        return int(count)
    count = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE $1 = ANY(pg_blocking_pids(pid)) "
        "AND ($2::text IS NULL OR application_name = $2::text)",
        blocker_pid,
        application_name,
    )
    return int(count)


def logged_matching(consumer: RunningConsumer, prefix: str) -> list[tuple[int, dict[str, Any]]]:
    """(line index, entry) of the consumer's JSON log entries whose message starts with `prefix`
    (the libraries' own log lines carry formatted messages, e.g. a group id)."""
    found = []
    for index, line in enumerate(consumer.lines):
        if line.startswith("{"):
            entry = json.loads(line)
            if str(entry.get("event", "")).startswith(prefix):
                found.append((index, entry))
    return found


async def drop_database(database_url: str, name: str) -> None:
    """Drop database `name` of the server at `database_url`, whoever is connected to it."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def assert_reconciled(
    pool: asyncpg.Pool, settings: Settings, periods: Sequence[str], tenant_id: str
) -> None:
    """`reconcile` over `periods` finds no drift in `tenant_id`'s numbers: everything the
    workers derived equals what its raw events (with their corrections) make it."""
    report = await reconcile(
        pool,
        settings,
        periods=periods,
        tenant_id=tenant_id,
        confirm_seconds=0,
        read_topic=False,
    )
    assert report.drifts == [], [drift.text() for drift in report.drifts]
