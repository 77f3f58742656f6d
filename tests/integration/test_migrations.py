"""Migrations: applied once, in order, safe to run twice and from two processes at once."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from llm_usage.storage.migrate import bundled_migrations, migrate
from tests.integration.pipeline import unique


async def run_migrate_command(
    database_url: str, command: str = "migrate", **env: str
) -> tuple[int, str]:
    """Run `llm-usage <command>` (migrate, maintain) on `database_url`; its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_usage",
        command,
        env={**os.environ, "DATABASE_URL": database_url, "METRICS_PORT": "0", **env},
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


async def test_maintain_says_what_it_did_and_a_worker_may_not_run_it(
    empty_database_url: str, tmp_path: Path
) -> None:
    assert (await run_migrate_command(empty_database_url))[0] == 0
    code, output = await run_migrate_command(
        empty_database_url, "maintain", ARCHIVE_URL=str(tmp_path)
    )
    assert code == 0, output
    assert output.splitlines() == [
        "months created: none",
        "ids older than the window pruned: 0",
        "ids counted before the window existed, pruned: 0",
        "budget counters and published alerts of periods past the horizon, pruned: 0",
    ]

    worker = unique("worker").replace("-", "_")
    connection = await asyncpg.connect(empty_database_url)
    try:
        await connection.execute(f"CREATE ROLE {worker} LOGIN IN ROLE llm_usage_worker")
        as_worker = urlunsplit(urlsplit(empty_database_url)._replace(netloc=f"{worker}@"))
        code, output = await run_migrate_command(as_worker, "maintain", ARCHIVE_URL=str(tmp_path))
    finally:
        await connection.execute(f"DROP ROLE {worker}")
        await connection.close()
    assert code == 2, output  # a person's mistake
    [line] = output.splitlines()
    assert "run `llm-usage maintain` as the schema owner" in line, line
