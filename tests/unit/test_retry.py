"""Only transient failures are retried; a bug or a bad row is raised at once."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    NotLeaderForPartitionError,
    UnknownTopicOrPartitionError,
)

from llm_usage.core.errors import TransientError
from llm_usage.runtime.retry import (
    is_transient,
    retry_transient,
    sleep_unless_stopping,
)
from llm_usage.storage.pool import DatabaseUnavailableError


def in_seconds(seconds: float) -> float:
    return time.monotonic() + seconds


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionRefusedError(), True),
        (asyncpg.exceptions.ConnectionDoesNotExistError(), True),
        (asyncpg.exceptions.CannotConnectNowError(), True),
        (asyncpg.exceptions.SerializationError(), True),
        (DatabaseUnavailableError("no connection"), True),
        (TransientError("the database refuses every new row"), True),
        (TimeoutError(), True),
        # Matched by type: an OSError that is not a connection failure is a bug or a setup error.
        (FileNotFoundError("/etc/llm-usage/ca.pem"), False),
        (PermissionError(), False),
        (asyncpg.InterfaceError("connection is closed"), False),
        (asyncpg.exceptions._base.DataError("invalid input for $1"), False),
        (KafkaConnectionError(), True),
        (NotLeaderForPartitionError(), True),
        (asyncpg.exceptions.UndefinedTableError(), False),
        (asyncpg.exceptions.CheckViolationError(), False),
        (UnknownTopicOrPartitionError(), True),
        (ValueError("bug"), False),
        # A Citus coordinator reports a worker's deadlock as XX000; any other XX000 is a fault.
        (asyncpg.exceptions.InternalServerError("deadlock detected"), True),
        (
            asyncpg.exceptions.InternalServerError(
                "canceling the transaction since it was involved in a distributed deadlock"
            ),
            True,
        ),
        (asyncpg.exceptions.InternalServerError("could not find block containing chunk"), False),
    ],
)
def test_is_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


async def test_transient_failures_are_retried_until_success() -> None:
    attempts: list[int] = []
    retried: list[str] = []

    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionResetError("server closed the connection")
        return "landed"

    result = await retry_transient(
        flaky,
        name="database",
        deadline=in_seconds(10),
        stopping=asyncio.Event(),
        on_retry=retried.append,
    )
    assert result == "landed"
    assert len(attempts) == 3
    assert retried == ["database", "database"]


async def test_a_bug_is_not_retried() -> None:
    attempts: list[int] = []

    async def broken() -> None:
        attempts.append(1)
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        await retry_transient(
            broken,
            name="database",
            deadline=in_seconds(10),
            stopping=asyncio.Event(),
            on_retry=print,
        )
    assert len(attempts) == 1


async def test_retrying_stops_when_shutdown_is_asked() -> None:
    stopping = asyncio.Event()
    attempts: list[int] = []

    async def down() -> None:
        attempts.append(1)
        stopping.set()
        raise ConnectionRefusedError("database is down")

    with pytest.raises(ConnectionRefusedError):
        await retry_transient(
            down, name="database", deadline=in_seconds(60), stopping=stopping, on_retry=print
        )
    assert attempts == [1], "no attempt after shutdown was asked for"


async def test_shutdown_wakes_a_backoff_sleep_at_once() -> None:
    stopping = asyncio.Event()
    sleep = sleep_unless_stopping(stopping)
    asyncio.get_running_loop().call_later(0.2, stopping.set)
    started = time.monotonic()
    await sleep(30)
    assert time.monotonic() - started < 1.0


async def test_retrying_gives_up_at_the_deadline() -> None:
    attempts: list[int] = []

    async def down() -> None:
        attempts.append(1)
        raise ConnectionRefusedError("database is down")

    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        await retry_transient(
            down,
            name="database",
            deadline=in_seconds(0.5),
            stopping=asyncio.Event(),
            on_retry=lambda _: None,
        )
    assert 0.5 <= time.monotonic() - started < 1.5
    assert len(attempts) >= 2
