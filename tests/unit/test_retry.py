"""Only transient failures are retried; a bug or a bad row is raised at once."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    NotLeaderForPartitionError,
    UnknownTopicOrPartitionError,
)

from llm_usage.consumers.runtime.retry import is_transient, retry_transient


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionRefusedError(), True),
        (asyncpg.exceptions.ConnectionDoesNotExistError(), True),
        (asyncpg.exceptions.CannotConnectNowError(), True),
        (asyncpg.exceptions.SerializationError(), True),
        (KafkaConnectionError(), True),
        (NotLeaderForPartitionError(), True),
        (asyncpg.exceptions.UndefinedTableError(), False),
        (asyncpg.exceptions.CheckViolationError(), False),
        (UnknownTopicOrPartitionError(), True),
        (ValueError("bug"), False),
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
        flaky, name="database", give_up_after=10, stopping=asyncio.Event(), on_retry=retried.append
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
            broken, name="database", give_up_after=10, stopping=asyncio.Event(), on_retry=print
        )
    assert len(attempts) == 1


async def test_retrying_stops_when_shutdown_is_asked() -> None:
    stopping = asyncio.Event()

    async def down() -> None:
        stopping.set()
        raise ConnectionRefusedError("database is down")

    with pytest.raises(ConnectionRefusedError):
        await retry_transient(
            down, name="database", give_up_after=60, stopping=stopping, on_retry=lambda _: None
        )


def test_a_closed_connection_is_transient_but_a_value_asyncpg_cannot_encode_is_not() -> None:
    assert is_transient(asyncpg.InterfaceError("connection is closed"))
    assert not is_transient(asyncpg.exceptions._base.DataError("invalid input for $1"))
