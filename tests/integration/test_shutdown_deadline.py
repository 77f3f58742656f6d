"""One deadline for the whole stop: SIGTERM ends a real worker within the documented bound while
PostgreSQL or Kafka does not answer (their processes paused with SIGSTOP: connections open,
nothing said), and what it abandoned is read again by the next run, never lost or counted twice.
A normal drain still commits everything it stored."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from llm_usage.kafka.topics import ensure_topics
from llm_usage.storage.invoice_lines import ROLLUP_LOCK_KEY
from llm_usage.storage.migrate import migrate
from llm_usage.testing.processes import free_port, http_get, spawn_llm_usage
from llm_usage.testing.topics import end_offsets
from tests.integration.pipeline import (
    PipelineTopics,
    RunningConsumer,
    committed_offsets,
    create_pipeline_topics,
    encode,
    produce,
    spawn_consumer,
    tenant_totals,
    unique,
    usage_event,
    wait_until,
)
from tests.unavailable import service_unavailable

# What docs/operations.md promises: a worker exits within 30 s of SIGTERM (the pods' grace is
# 45 s), whatever the database or the broker is doing.
SHUTDOWN_PROMISE_SECONDS = 30.0


@contextlib.contextmanager
def paused(pids: list[int]) -> Iterator[None]:
    """SIGSTOP the processes (their sockets stay open, they answer nothing), SIGCONT on exit."""
    stopped = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def worker_backends(pool: asyncpg.Pool, since: object) -> list[int]:
    """The server processes of the connections a worker opened since `since`."""
    rows = await pool.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'llm-usage' "
        "AND datname = current_database() AND backend_start >= $1",
        since,
    )
    return [row["pid"] for row in rows]


def broker_pid(bootstrap_servers: str) -> int:
    """The local process listening on the first bootstrap address (read from /proc)."""
    port = int(bootstrap_servers.split(",", maxsplit=1)[0].rsplit(":", 1)[1])
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                listening = fields[3] == "0A"
                if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    sockets.add(f"socket:[{fields[9]}]")
    for descriptor in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(descriptor) in sockets:
                return int(descriptor.parts[2])
    service_unavailable(f"the broker at {bootstrap_servers} is not a local process to pause")
    raise AssertionError("unreachable")


async def stop_time(consumer: RunningConsumer) -> float:
    """SIGTERM; how long until the process exited (exit code 0 asserted, within the bound)."""
    started = time.monotonic()
    consumer.process.send_signal(signal.SIGTERM)
    code = await consumer.finished(within=SHUTDOWN_PROMISE_SECONDS + 15)
    seconds = time.monotonic() - started
    print(f"SIGTERM to exit: {seconds:.1f} s")  # noqa: T201 - the figure the report quotes
    assert code == 0, consumer.log_tail()
    return seconds


async def logged(consumer: RunningConsumer, event: str, *, within: float = 60) -> None:
    async def seen() -> bool:
        return bool(consumer.logged(event))

    await wait_until(seen, within=within, message=f"never logged {event!r}")


async def tenant_spend(pool: asyncpg.Pool, tenant: str) -> Decimal:
    value = await pool.fetchval(
        "SELECT coalesce(sum(spend_usd), 0) FROM budget_spend WHERE tenant_id = $1 "
        "AND scope_type = 'tenant' AND \"window\" = 'monthly'",
        tenant,
    )
    return Decimal(value)


async def test_sigterm_while_postgresql_does_not_answer_stops_the_budget_consumer_in_time(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=2
    )
    await ensure_topics(topics.settings, [topics.settings.alerts_topic], partitions=1)
    env = {**topics.environment(), "CONSUMER_MAX_BATCH": "25", "BUDGET_POLICY_SWEEP_SECONDS": "1"}
    tenant = unique("tenant")
    events = [usage_event(tenant, customer_charge_usd="0.01") for _ in range(200)]
    since = await pool.fetchval("SELECT now()")
    consumer = await spawn_consumer(topics, env=env, worker="budget")
    await logged(consumer, "Partitions assigned.")
    await logged(consumer, "This replica relays budget alerts.")
    await produce(kafka_bootstrap_servers, topics.usage, [(None, encode(e)) for e in events[:100]])

    async def first_counted() -> bool:
        return await tenant_spend(pool, tenant) == Decimal("1.00")

    await wait_until(first_counted, within=60, message="the first events were not counted")
    backends = await worker_backends(pool, since)
    assert len(backends) >= 3, backends  # the pool, the watcher's LISTEN, the relay's lock
    with paused(backends):
        # A batch now hangs in hand, the side tasks' queries hang, closing the pool would hang.
        await produce(
            kafka_bootstrap_servers, topics.usage, [(None, encode(e)) for e in events[100:]]
        )
        await asyncio.sleep(2)
        seconds = await stop_time(consumer)
    assert seconds < SHUTDOWN_PROMISE_SECONDS, consumer.log_tail()

    # Nothing it abandoned is lost or counted twice: the next run counts the rest exactly once.
    drain = await spawn_consumer(topics, "--exit-when-idle", "3", env=env, worker="budget")
    assert await drain.finished(within=120) == 0, drain.log_tail()
    assert await tenant_spend(pool, tenant) == Decimal("2.00")


async def test_sigterm_while_kafka_does_not_answer_stops_the_usage_consumer_in_time(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=2
    )
    broker = broker_pid(kafka_bootstrap_servers)
    tenant = unique("tenant")
    events = [usage_event(tenant) for _ in range(100)]
    consumer = await spawn_consumer(topics, env=topics.environment())
    await logged(consumer, "Partitions assigned.")
    async with pool.acquire() as locker:
        transaction = locker.transaction()
        await transaction.start()
        held = True
        try:
            # The next batch waits on this lock, then lands while the broker is paused: its
            # offsets' commit waits for a coordinator that does not answer.
            await locker.execute("LOCK TABLE llm_usage_events IN SHARE MODE")
            await produce(
                kafka_bootstrap_servers, topics.usage, [(None, encode(e)) for e in events]
            )

            async def hanging() -> bool:
                return bool(
                    await pool.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE "
                        "application_name = 'llm-usage' AND wait_event_type = 'Lock'"
                    )
                )

            await wait_until(hanging, within=60, message="the batch never reached the lock")
            with paused([broker]):
                await transaction.rollback()
                held = False

                async def landed() -> bool:
                    return (await tenant_totals(pool, tenant))[0] > 0

                await wait_until(landed, within=30, message="the batch never landed")
                await asyncio.sleep(1)
                seconds = await stop_time(consumer)
        finally:
            if held:
                await transaction.rollback()
    assert seconds < SHUTDOWN_PROMISE_SECONDS, consumer.log_tail()

    drain = await spawn_consumer(topics, "--exit-when-idle", "3")
    assert await drain.finished(within=120) == 0, drain.log_tail()
    assert (await tenant_totals(pool, tenant))[0] == len(events)
    await assert_all_committed(topics)


@pytest.mark.parametrize("worker", ["usage", "budget"])
async def test_a_normal_drain_commits_everything_stored_and_exits_at_once(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool, worker: str
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=2
    )
    await ensure_topics(topics.settings, [topics.settings.alerts_topic], partitions=1)
    tenant = unique("tenant")
    events = [usage_event(tenant, customer_charge_usd="0.01") for _ in range(300)]
    env = {**topics.environment(), "CONSUMER_MAX_BATCH": "50", "BUDGET_MAX_BATCH": "50"}
    consumer = await spawn_consumer(topics, env=env, worker=worker)
    await logged(consumer, "Partitions assigned.")
    await produce(kafka_bootstrap_servers, topics.usage, [(None, encode(e)) for e in events])

    async def stored() -> bool:
        if worker == "budget":
            return await tenant_spend(pool, tenant) == Decimal("3.00")
        return (await tenant_totals(pool, tenant))[0] == len(events)

    await wait_until(stored, within=60, message="the events were not stored")
    seconds = await stop_time(consumer)
    assert seconds < 10, consumer.log_tail()
    group = topics.settings.budget_group_id if worker == "budget" else None
    await assert_all_committed(topics, group=group)


async def test_sigterm_during_a_rollup_tick_that_waits_stops_the_schedule_in_time_alive(
    database_url: str, tmp_path: Path
) -> None:
    name = f"rollup_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    scheme, _, rest = database_url.partition("://")
    authority, _, tail = rest.partition("/")
    _, query_mark, query = tail.partition("?")
    url = f"{scheme}://{authority}/{name}" + (f"?{query}" if query_mark else "")
    holder = await asyncpg.connect(url)
    try:
        await migrate(holder)
        port = free_port()
        async with holder.transaction():
            # Every rollup run waits for this lock: the leader's first tick hangs in it, the
            # way a month-end run at 10,000 tenants takes minutes.
            await holder.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK_KEY)
            process = await spawn_llm_usage(
                "rollup",
                "schedule",
                env={**os.environ, "DATABASE_URL": url, "METRICS_PORT": str(port)},
                log_path=tmp_path / "rollup.log",
            )
            try:

                async def tick_waits() -> bool:
                    # Not on `holder`: a transaction sees one snapshot of pg_stat_activity.
                    return bool(
                        await admin.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
                            "AND application_name = 'llm-usage' AND wait_event_type = 'Lock'",
                            name,
                        )
                    )

                await wait_until(tick_waits, within=60, message="the tick never started")
                status, _ = http_get(f"http://127.0.0.1:{port}/healthz")
                assert status == 200
                started = time.monotonic()
                process.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(process.wait(), SHUTDOWN_PROMISE_SECONDS + 15)
                seconds = time.monotonic() - started
                print(f"SIGTERM to exit: {seconds:.1f} s")  # noqa: T201 - for the report
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        log = (tmp_path / "rollup.log").read_text()
        assert code == 0, log[-3000:]
        assert seconds < SHUTDOWN_PROMISE_SECONDS, log[-3000:]
    finally:
        await holder.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def assert_all_committed(topics: PipelineTopics, *, group: str | None = None) -> None:
    bootstrap = topics.settings.kafka_bootstrap_servers
    ends = await end_offsets(bootstrap, topics.usage)
    group = group or topics.settings.usage_group_id
    committed = await committed_offsets(bootstrap, group, topics.usage)
    assert committed == {p: end for p, end in ends.items() if end > 0}


pytestmark = pytest.mark.timeout(300)
