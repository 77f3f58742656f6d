"""Everything under tests/integration needs the real services: mark it so; shared fixtures."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from llm_usage.storage.distribution import distribute
from llm_usage.storage.migrate import migrate
from tests.integration.pipeline import (
    PipelineTopics,
    create_pipeline_topics,
    kill_leftovers,
    unique,
)

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on the migrated session database, for a test's own queries."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    async with pool.acquire() as connection:
        await migrate(connection)
    yield pool
    await pool.close()


def _on_citus() -> bool:
    """The session's PostgreSQL is a Citus cluster (tests/conftest.py, `citus_cluster`)."""
    return os.environ.get("LLM_USAGE_TEST_CITUS") == "1"


@pytest.fixture
async def empty_database_url(database_url: str, request: pytest.FixtureRequest) -> str:
    """A database of the test's own on the session's server, never migrated: for tests that
    apply migrations from nothing, or create, drop and move partitions. On Citus
    (`LLM_USAGE_TEST_CITUS=1`), a Citus database of the session's cluster."""
    name = unique("own").replace("-", "_")
    if _on_citus():
        return str(await request.getfixturevalue("citus_cluster").add_database(name))
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))


@pytest.fixture
async def rollup_db(
    empty_database_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    """A migrated database of the test's own and a pool on it: which months are closed, and
    their late marks, are global to a database. Migrated as of the test module's injected
    clock (its `NOW`, when it has one), so that the months it names are kept whatever today is,
    and as of today for the tests that use the workers' clock. On Citus, distributed as
    `llm-usage migrate` does."""
    now = getattr(request.module, "NOW", None)
    pool = await asyncpg.create_pool(empty_database_url, min_size=1, max_size=4)
    assert pool is not None
    async with pool.acquire() as connection:
        if now is not None:
            await migrate(connection, today=now.date())
        await migrate(connection)
        if _on_citus():
            await distribute(connection)
    yield empty_database_url, pool
    await pool.close()


@pytest.fixture(autouse=True)
async def no_process_outlives_its_test() -> AsyncIterator[None]:
    """A consumer a failing test left running would keep reading, and loading the machine."""
    yield
    await kill_leftovers()


@pytest.fixture
async def topics(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> PipelineTopics:
    """A test's own usage, DLQ (and alerts) topics of 3 partitions, on a migrated database;
    a module needing another shape defines its own."""
    return await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=3
    )
