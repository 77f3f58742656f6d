"""A borrowed connection that asyncpg leaves mid-operation is dropped and reported as a passing
database fault (retried), never as a bug that stops the worker."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from llm_usage.storage.pool import DatabaseUnavailableError, connection_from, create_pool


async def _query_beside_a_running_one(
    pool: asyncpg.Pool, pids: list[int], running: list[asyncio.Task[object]]
) -> None:
    async with connection_from(pool) as connection:
        pids.append(await connection.fetchval("SELECT pg_backend_pid()"))
        running.append(asyncio.create_task(connection.fetchval("SELECT pg_sleep(30)")))
        await asyncio.sleep(0.2)
        await connection.fetchval("SELECT 1")


async def test_a_connection_left_mid_operation_is_dropped_and_retried(database_url: str) -> None:
    pool = await create_pool(database_url, size=1)
    pids: list[int] = []
    running: list[asyncio.Task[object]] = []
    try:
        with pytest.raises(DatabaseUnavailableError, match="mid-operation"):
            await _query_beside_a_running_one(pool, pids, running)
        # Dropping the connection ended the query the client was still waiting for.
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await asyncio.wait_for(running[0], 10)
        async with connection_from(pool) as connection:
            assert await connection.fetchval("SELECT 1") == 1
            assert await connection.fetchval("SELECT pg_backend_pid()") != pids[0]
    finally:
        await pool.close()
