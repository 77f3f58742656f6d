"""`llm-usage maintain` in the image, run as the maintain CronJob's pod runs it (read-only root,
/tmp a tmpfs, uid 10001, HOME=/nonexistent), against a database of its own on the session's
PostgreSQL.

Without ARCHIVE_URL the archive's default directory is under the user's home, which the image
does not have: a month past retention is detached, never dropped, and maintain stops with one
line naming ARCHIVE_URL (the manifests never let it get that far: their pods need ARCHIVE_URL from
the Secret `llm-usage-archive`). With ARCHIVE_URL on a volume the pod can write, the month is
archived, verified and dropped.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from llm_usage.core.clock import CLOCK_VARIABLE, SimulatedClock
from llm_usage.domain.periods import add_months
from llm_usage.domain.retention import partition_name
from tests.clock import now, this_month
from tests.image.conftest import Containers, Database, container_database

# Past the default RETENTION_MONTHS (25) by two months: the oldest months migrate made are due.
MONTHS_LATER = 27


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
def own_database(database_url: str) -> Iterator[str]:
    """A database of this test's own, dropped after it (maintain detaches and drops months)."""
    name = f"maintain_image_{uuid.uuid4().hex[:8]}"

    async def execute(sql: str) -> None:
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(execute(f"CREATE DATABASE {name}"))
    try:
        yield with_database(database_url, name)
    finally:
        asyncio.run(execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def later_clock() -> str:
    """A clock MONTHS_LATER months ahead of now, for `maintain` only."""
    start = datetime.combine(add_months(this_month(), MONTHS_LATER), now().time(), tzinfo=UTC)
    return SimulatedClock(start=start, real_start=time.time(), rate=1).encode()


async def month_state(dsn: str, month_table: str) -> tuple[str | None, bool]:
    connection = await asyncpg.connect(dsn)
    try:
        state = await connection.fetchval(
            "SELECT state FROM usage_event_months WHERE month = $1",
            datetime.strptime(month_table[-7:], "%Y_%m").date(),  # noqa: DTZ007 - a date
        )
        exists = await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", month_table)
    finally:
        await connection.close()
    return state, bool(exists)


def test_maintain_without_an_archive_url_stops_in_one_line_and_keeps_the_month(
    image: str, own_database: str
) -> None:
    containers = Containers(image, container_database(own_database), {})
    migrated = containers.run("migrate")
    assert migrated.returncode == 0, migrated.stderr
    oldest = add_months(this_month(), -25)

    stopped = containers.run("maintain", environment={CLOCK_VARIABLE: later_clock()})

    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1, stopped.stderr
    assert lines[0].startswith("llm-usage: error: the archive at /nonexistent/"), lines
    assert "ARCHIVE_URL" in lines[0], lines
    print(f"\nmaintain without ARCHIVE_URL: exit 2, {lines[0]}")  # noqa: T201 - the figure
    # Detached for good (new events of it are `expired`), but not dropped: no archive, no drop.
    table = partition_name(oldest)
    assert asyncio.run(month_state(own_database, table)) == ("detached", True)


def test_maintain_with_an_archive_url_on_a_volume_archives_and_drops(
    image: str, own_database: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    archive = tmp_path_factory.mktemp("archive")
    archive.chmod(0o777)  # the container's uid 10001 writes it
    containers = Containers(image, container_database(own_database), {})
    assert containers.run("migrate").returncode == 0
    oldest = add_months(this_month(), -25)
    volume = ("--volume", f"{archive}:/var/lib/llm-usage/archive")
    containers.database = Database(
        dsn=containers.database.dsn,
        container_dsn=containers.database.container_dsn,
        mounts=(*containers.database.mounts, *volume),
    )

    started = time.monotonic()
    done = containers.run(
        "maintain",
        environment={
            CLOCK_VARIABLE: later_clock(),
            "ARCHIVE_URL": "/var/lib/llm-usage/archive",
        },
        timeout=600,
    )

    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    retired = done.stdout.count("archived, verified and dropped")
    print(f"\nmaintain retired {retired} empty months in {took:.1f} s")  # noqa: T201
    assert f"month {oldest:%Y-%m} past retention: archived, verified and dropped" in done.stdout
    assert (archive / f"{oldest:%Y-%m}" / "manifest.json").is_file()
    assert asyncio.run(month_state(own_database, partition_name(oldest))) == ("dropped", False)
    assert not list(archive.rglob("*.partial"))
