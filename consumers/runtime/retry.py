"""Which failures are transient, and how a batch is retried through them (tenacity)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import structlog
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from llm_usage.storage.pool import CONNECTION_ERRORS

T = TypeVar("T")
log = structlog.get_logger(__name__)

_TRANSIENT_DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.exceptions.SerializationError,
    # 57xxx: shutdown, a cancelled statement, a crash of another backend.
    asyncpg.exceptions.OperatorInterventionError,
    # A failover briefly leaves clients connected to a read-only standby.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.TooManyConnectionsError,
    # Raised when the pool resets a connection whose query the server's shutdown cut off; the
    # pool has already terminated that connection and the next attempt gets a fresh one.
    asyncpg.exceptions.InternalClientError,
)


def is_transient(error: BaseException) -> bool:
    """True for failures that go away by themselves: a restarting database, a moving leader."""
    if isinstance(error, _TRANSIENT_DATABASE_ERRORS):
        return True
    # asyncpg raises the bare InterfaceError for "connection is closed" once the server went away;
    # its subclasses (client-side data errors, configuration) are not transient.
    if type(error) is asyncpg.InterfaceError and "closed" in str(error):
        return True
    if isinstance(error, KafkaConnectionError | KafkaTimeoutError):
        return True
    return isinstance(error, KafkaError) and bool(getattr(error, "retriable", False))


class _StopWhenSet(stop_base):
    """Stop retrying once shutdown was asked for: an unlanded batch is abandoned, not forced."""

    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._event.is_set()


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    *,
    name: str,
    give_up_after: float,
    stopping: asyncio.Event,
    on_retry: Callable[[str], None],
) -> T:
    """Run `operation`, retrying transient failures with jittered exponential backoff.

    Gives up (re-raising the last error) after `give_up_after` seconds or once `stopping` is set.
    Anything not transient is raised at once: a bug or a bad row is never retried.
    """

    def before_sleep(state: RetryCallState) -> None:
        on_retry(name)
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        log.warning(
            "Retrying after a transient failure.",
            operation=name,
            attempt=state.attempt_number,
            wait_seconds=round(state.upcoming_sleep, 2),
            error=f"{type(error).__name__}: {error}",
        )

    retrying = AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.5),
        stop=stop_after_delay(give_up_after) | _StopWhenSet(stopping),
        before_sleep=before_sleep,
        reraise=True,
    )

    async def attempt() -> T:
        # tenacity awaits only what is declared `async def`; a lambda's coroutine would leak.
        return await operation()

    return await retrying(attempt)
