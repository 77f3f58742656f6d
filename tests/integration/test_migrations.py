"""Migrations: applied once, in order, safe to run twice and from two processes at once."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from llm_usage.storage.migrate import bundled_migrations, migrate


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
    # One index on the events: Tier 1 of the identity, covering the reports (0005's covering index
    # and the old primary key on the id alone are gone with the partitioning of 0009).
    assert indexes == {"llm_usage_events_identity"}
