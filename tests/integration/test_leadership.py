"""The advisory-lock leadership the alert relay and the rollup schedule share, against the real
PostgreSQL: a standby asks for the lock on one kept-open connection (no reconnect per try),
takes over on that connection when the leader's dies, and a leader that loses its own
connection leads again on a new one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime

import asyncpg
from prometheus_client import CollectorRegistry, Gauge

from llm_usage.runtime.leadership import Leadership, Lease, lead_while_held
from tests.integration.pipeline import wait_until


async def standby_backends(pool: asyncpg.Pool, since: datetime) -> set[int]:
    rows = await pool.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'llm-usage' "
        "AND datname = current_database() AND backend_start >= $1",
        since,
    )
    return {row["pid"] for row in rows}


async def test_a_standby_keeps_one_connection_and_takes_over_when_the_leader_goes(
    database_url: str, pool: asyncpg.Pool
) -> None:
    key = uuid.uuid4().int & ((1 << 62) - 1)
    other = await asyncpg.connect(database_url)  # another replica, leading
    assert await other.fetchval("SELECT pg_try_advisory_lock($1)", key)
    since = await pool.fetchval("SELECT now()")
    registry = CollectorRegistry()
    leader = Gauge("test_leader", "1 while leading.", registry=registry)
    stopping = asyncio.Event()
    tries: list[bool] = []
    leads: list[int] = []

    async def lead(lease: Lease) -> None:
        leads.append(await lease.connection.fetchval("SELECT pg_backend_pid()"))
        while not stopping.is_set():
            lease.ensure_held()
            await asyncio.sleep(0.02)

    standing_by = asyncio.create_task(
        lead_while_held(
            Leadership(
                database_url=database_url,
                key=key,
                holder="test",
                leader=leader,
                standby_seconds=0.02,
                retry_seconds=0.02,
                paused="Test leadership paused.",
            ),
            stopping,
            lead,
            on_try=tries.append,
        )
    )
    try:
        seen: set[int] = set()

        async def tried_often() -> bool:
            seen.update(await standby_backends(pool, since))
            return len(tries) >= 30

        await wait_until(tried_often, within=30, message="the standby did not keep trying")
        assert not any(tries)
        assert len(seen) == 1, f"{len(tries)} tries opened {len(seen)} connections"
        assert registry.get_sample_value("test_leader") == 0

        # The leader's connection dies: the standby takes the lock on the connection it kept.
        await pool.execute("SELECT pg_terminate_backend($1)", other.get_server_pid())
        await wait_until(_true_when(lambda: bool(leads)), within=10, message="no takeover")
        assert leads == list(seen)
        assert registry.get_sample_value("test_leader") == 1

        # Its own connection dies: the lease is lost, and taken again on a new connection.
        await pool.execute("SELECT pg_terminate_backend($1)", leads[0])
        await wait_until(_true_when(lambda: len(leads) == 2), within=10, message="not retaken")
        assert leads[1] != leads[0]
    finally:
        stopping.set()
        await asyncio.wait_for(standing_by, 10)
        await other.close()
    assert registry.get_sample_value("test_leader") == 0
    # Leaving closed the lock's connection: the lock is free for the next replica.
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND ((classid::bigint << 32) | objid::bigint) = $1",
            key,
        )
        == 0
    )


def _true_when(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return check()

    return condition
