"""Migrations: applied once, in order, safe to run twice and from two processes at once."""

from __future__ import annotations

import asyncio
import os
import sys
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from llm_usage.storage.migrate import bundled_migrations, migrate
from tests.integration.pipeline import unique


@pytest.fixture
async def empty_database_url(database_url: str) -> str:
    """A database of its own, so this test sees migrations applied from nothing."""
    name = unique("migrations").replace("-", "_")
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))


async def run_migrate_command(database_url: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_usage",
        "migrate",
        env={**os.environ, "DATABASE_URL": database_url, "METRICS_PORT": "0"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_two_processes_migrating_at_once_apply_each_migration_once(
    empty_database_url: str,
) -> None:
    results = await asyncio.gather(
        run_migrate_command(empty_database_url), run_migrate_command(empty_database_url)
    )
    assert [code for code, _ in results] == [0, 0], results
    outputs = sorted(output.strip() for _, output in results)
    versions = [m.version for m in bundled_migrations()]
    assert outputs == sorted([f"applied {', '.join(versions)}", "database is up to date"])

    connection = await asyncpg.connect(empty_database_url)
    try:
        applied = [
            r["version"]
            for r in await connection.fetch(
                "SELECT version FROM schema_migrations ORDER BY version"
            )
        ]
        assert applied == versions
        assert await migrate(connection) == [], "a third run must find nothing to do"
        indexes = {
            r["indexname"]
            for r in await connection.fetch(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'llm_usage_events'"
            )
        }
    finally:
        await connection.close()
    assert {"llm_usage_events_pkey", "llm_usage_events_tenant_occurred_at"} <= indexes
    # Dropped by 0005: the covering index serves every query it served, for less write cost.
    assert "llm_usage_events_deployment_occurred_at" not in indexes
