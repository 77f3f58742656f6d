"""Citus, for real: the cluster `llm-usage dev up --citus` runs (a coordinator and two workers
built from the vendored source, cached), the schema `llm-usage migrate` distributes, and the
usage consumer storing every event exactly once through the coordinator."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from llm_usage.archive.retention import retire_months
from llm_usage.archive.targets import local_target
from llm_usage.consumers.usage.consumer import run_usage_consumer
from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.domain.periods import add_months
from llm_usage.local.citus import WORKER_PORTS, LocalCitusCluster, ensure_citus_build
from llm_usage.runtime.handler import BatchResult
from llm_usage.storage import distribution
from llm_usage.storage.migrate import migrate
from tests import clock
from tests.integration.local_state import exports, local_state, wait_until_gone
from tests.integration.pipeline import (
    PipelineTopics,
    create_pipeline_topics,
    encode,
    produce,
    stored_for,
    tenant_totals,
    topic_record_count,
    unique,
    usage_event,
)
from tests.records import consumer_record


@pytest.fixture
def database_url(citus_cluster: LocalCitusCluster) -> str:
    """This module's tests run against the session's Citus coordinator, whatever the others use."""
    return citus_cluster.dsn


@pytest.fixture
async def topics(kafka_bootstrap_servers: str, database_url: str) -> PipelineTopics:
    return await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=3
    )


@pytest.fixture
async def fresh_database(citus_cluster: LocalCitusCluster) -> str:
    """Another database of the session's cluster, with Citus and its workers but no schema."""
    return await citus_cluster.add_database(unique("citus_db").replace("-", "_"))


def test_the_build_is_cached_and_the_cluster_has_two_workers(
    citus_cluster: LocalCitusCluster,
) -> None:
    started = time.monotonic()
    install = ensure_citus_build()
    assert time.monotonic() - started < 1, "a second ensure_citus_build() must reuse the cache"
    assert (install / "lib" / "citus.so").is_file()
    assert citus_cluster.is_running()


async def test_migrate_distributes_the_schema_as_planned_and_only_once(
    fresh_database: str,
) -> None:
    first = _llm_usage("migrate", database_url=fresh_database)
    assert first.returncode == 0, first.stderr
    assert "distributed llm_usage_events (on tenant_id" in first.stdout

    connection = await asyncpg.connect(fresh_database)
    try:
        tables = {
            row["table_name"]: (row["citus_table_type"], row["distribution_column"])
            for row in await connection.fetch(
                "SELECT table_name::text, citus_table_type, distribution_column FROM citus_tables"
            )
        }
        schema_tables = [
            row[0]
            for row in await connection.fetch(
                "SELECT relname::text FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                "AND relkind IN ('r', 'p') AND NOT relispartition"
            )
        ]
        colocation = {
            row["table_name"]: row["colocation_id"]
            for row in await connection.fetch(
                "SELECT table_name::text, colocation_id FROM citus_tables"
            )
        }
    finally:
        await connection.close()
    for plan in distribution.DISTRIBUTED:
        if plan.table in tables:
            assert tables[plan.table] == ("distributed", plan.column), plan.table
    for reference in distribution.REFERENCE:
        if reference.table in tables:
            assert tables[reference.table][0] == "reference", reference.table
    # Everything keyed by tenant sits with the events; the id window in a group of its own.
    tenant_keyed = [p.table for p in distribution.DISTRIBUTED if p.column == "tenant_id"]
    assert {colocation[t] for t in tenant_keyed if t in colocation} == {
        colocation["llm_usage_events"]
    }
    assert colocation["usage_event_ids"] != colocation["llm_usage_events"]
    for table in distribution.LOCAL:
        assert table not in tables, f"{table} should stay on the coordinator"
    # Every table of the schema has a place in the plan: a new one must be given one.
    planned = {p.table for p in distribution.DISTRIBUTED} | {
        r.table for r in distribution.REFERENCE
    }
    assert set(schema_tables) - planned - set(distribution.LOCAL) == set()

    again = _llm_usage("migrate", database_url=fresh_database)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "database is up to date"


async def test_usage_consumer_stores_duplicates_once_through_the_coordinator(
    topics: PipelineTopics, database_url: str
) -> None:
    tenant = unique("tenant")
    at = clock.earlier_today().replace(microsecond=0)
    events = [
        usage_event(tenant, customer_charge_usd=f"0.00{n}1", occurred_at=clock.iso(at))
        for n in range(1, 6)
    ]
    key = tenant.encode()
    # Every event twice in the first batch, then all of them again: a gateway retry storm.
    records = [(key, encode(event)) for event in events for _ in range(2)]
    await produce(topics.settings.kafka_bootstrap_servers, topics.usage, records)
    await _consume_until_idle(topics)
    await produce(topics.settings.kafka_bootstrap_servers, topics.usage, records[::2])
    await _consume_until_idle(topics)

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        rows = await stored_for(pool, [event["gateway_request_id"] for event in events])
        assert len(rows) == len(events)
        assert await tenant_totals(pool, tenant) == (5, Decimal("0.0155"))
        # Stored on a worker, not on the coordinator.
        ports = {
            row["nodeport"]
            for row in await pool.fetch(
                "SELECT DISTINCT s.nodeport FROM citus_shards AS s WHERE s.shardid IN ("
                "    SELECT get_shard_id_for_distribution_column(c.relid, $1::text)"
                "    FROM pg_partition_tree('llm_usage_events') AS c WHERE c.isleaf)",
                tenant,
            )
        }
        assert ports
        assert ports <= set(WORKER_PORTS)
    finally:
        await pool.close()
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.dlq) == 0


async def test_a_month_past_retention_is_detached_archived_and_dropped_on_citus(
    fresh_database: str, tmp_path: Path
) -> None:
    """Citus refuses DETACH ... CONCURRENTLY: `maintain` detaches with a plain DETACH there, and
    the month is archived, verified and dropped as on one node; its late events are expired."""
    connection = await asyncpg.connect(fresh_database)
    target = local_target(tmp_path)
    try:
        await migrate(connection, retention_months=1)
        await distribution.distribute(connection)
        oldest = await connection.fetchval(
            "SELECT min(month) FROM usage_event_months WHERE state = 'attached'"
        )
        partition = f"llm_usage_events_{oldest:%Y_%m}"
        assert (
            await connection.fetchval(
                "SELECT citus_table_type FROM citus_tables WHERE table_name = $1::regclass",
                partition,
            )
            == "distributed"
        )
        tenant = unique("tenant")
        assert await _store_on(fresh_database, tenant, oldest, 40) == {"recorded": 40}
        kept = unique("tenant")
        assert await _store_on(fresh_database, kept, clock.this_month(), 2) == {"recorded": 2}
        aggregate = "SELECT count(*) FROM usage_daily_dimensions WHERE tenant_id = $1"
        assert await connection.fetchval(aggregate, tenant) == 7

        [retired] = await retire_months(
            connection,
            today=add_months(clock.today().replace(day=1), 1),
            retention_months=1,
            target=target,
        )

        assert retired.month == oldest
        assert retired.dropped, retired.report.differences
        assert retired.report.rows == 40
        # The month's aggregate went with it (a DELETE over every shard); the kept one's stays.
        assert await connection.fetchval(aggregate, tenant) == 0
        assert await connection.fetchval(aggregate, kept) == 7
        assert await connection.fetchval("SELECT to_regclass($1)", partition) is None
        assert (
            await connection.fetchval(
                "SELECT state FROM usage_event_months WHERE month = $1", oldest
            )
            == "dropped"
        )
        assert await _store_on(fresh_database, tenant, oldest, 1) == {"dead_lettered": 1}
        assert await connection.fetchval("SELECT count(*) FROM llm_usage_events") == 2  # kept
    finally:
        await connection.close()


async def _store_on(
    database_url: str, tenant: str, month: date, count: int
) -> Counter[BatchResult]:
    """`count` events of `tenant` on the month's first day, through the usage consumer's handler."""
    occurred = datetime.combine(month, datetime.min.time(), tzinfo=UTC).isoformat()
    records = [
        consumer_record(encode(usage_event(tenant, occurred_at=occurred)), offset=n)
        for n in range(count)
    ]
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    assert pool is not None
    try:
        outcome = await UsageRecorder(pool=pool, clock=clock.now).record_batch(records)
    finally:
        await pool.close()
    return outcome.counts


def test_dev_up_citus_runs_a_distributed_database_and_dev_down_stops_it(
    citus_cluster: LocalCitusCluster,  # the build, cached
) -> None:
    with local_state() as state:
        up = state.run("dev", "up", "--citus", "--partitions", "1", timeout=300)
        assert up.returncode == 0, up
        assert "local Kafka and Citus are up; to reach them:" in up.stdout
        assert f"coordinator (workers beside it) listens on a Unix socket in {state.path}" in (
            up.stdout
        )
        reached = exports(state.run("dev", "env").stdout)
        assert reached["DATABASE_URL"].endswith(f"?host={state.path / 'citus' / 'sockets'}")
        # `dev up` migrated and distributed: nothing left to do.
        migrated = state.run("migrate", env=reached)
        assert migrated.returncode == 0, migrated
        assert migrated.stdout.strip() == "database is up to date"
        workers = state.python(
            "import asyncio, asyncpg, os\n"
            "async def main():\n"
            "    c = await asyncpg.connect(os.environ['DATABASE_URL'])\n"
            '    print(await c.fetchval("SELECT count(*) FROM citus_get_active_worker_nodes()"))\n'
            '    print(await c.fetchval("SELECT count(*) FROM citus_tables"))\n'
            "    await c.close()\n"
            "asyncio.run(main())",
            env=reached,
        )
        assert workers.returncode == 0, workers
        worker_count, distributed_tables = map(int, workers.stdout.split())
        assert worker_count == 2
        assert distributed_tables >= len(distribution.DISTRIBUTED)

        down = state.run("dev", "down")
        assert down.returncode == 0, down
        assert wait_until_gone(state) == {}


async def _consume_until_idle(topics: PipelineTopics) -> None:
    await asyncio.wait_for(
        run_usage_consumer(topics.settings, exit_when_idle=1.5, registry=CollectorRegistry()),
        timeout=120,
    )


def _llm_usage(*arguments: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_usage", *arguments],
        env={**os.environ, "DATABASE_URL": database_url, "METRICS_PORT": "0"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
