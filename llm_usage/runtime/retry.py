"""Which failures are transient, how a batch is retried through them (tenacity), and how a task
whose result is no longer wanted is let go."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import structlog
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter
from tenacity.stop import stop_base

from llm_usage.core.errors import TransientError

T = TypeVar("T")
log = structlog.get_logger(__name__)

# Matched by type, never by message text: what a restarting database, a failover or a dropped
# socket raise. A client-side encoding error or a bug in a query is none of these.
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientError,
    ConnectionError,  # refused, reset, aborted, broken pipe
    TimeoutError,
    socket.gaierror,  # a name that does not resolve yet (a pod or service being replaced)
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08: the connection broke
    asyncpg.exceptions.CannotConnectNowError,  # starting up or shutting down
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
    asyncpg.exceptions.ConnectionDoesNotExistError,
    KafkaConnectionError,
    KafkaTimeoutError,
)


# The one exception to matching by type: a Citus coordinator reports a worker's deadlock (or its
# own distributed-deadlock detector cancelling one transaction) as SQLSTATE XX000, not 40P01.
_CITUS_DEADLOCKS = ("deadlock detected", "involved in a distributed deadlock")


def is_transient(error: BaseException) -> bool:
    """True for failures that go away by themselves: a restarting database, a moving leader."""
    if isinstance(error, _TRANSIENT_ERRORS):
        return True
    if isinstance(error, asyncpg.exceptions.InternalServerError):
        return any(text in str(error) for text in _CITUS_DEADLOCKS)
    return isinstance(error, KafkaError) and bool(getattr(error, "retriable", False))


class _StopAtDeadline(stop_base):
    """Stop at a monotonic deadline shared by every retried step of one batch, or on shutdown:
    an unlanded batch is abandoned (and fetched again), never forced."""

    def __init__(self, deadline: float, stopping: asyncio.Event) -> None:
        self._deadline = deadline
        self._stopping = stopping

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._stopping.is_set() or time.monotonic() >= self._deadline


def sleep_unless_stopping(stopping: asyncio.Event) -> Callable[[float], Awaitable[None]]:
    """A sleep for tenacity that SIGTERM wakes at once (asyncio.sleep cannot be woken)."""

    async def sleep(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=seconds)

    return sleep


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    *,
    name: str,
    deadline: float,
    stopping: asyncio.Event,
    on_retry: Callable[[str], None],
) -> T:
    """Run `operation`, retrying transient failures with jittered exponential backoff.

    Gives up (re-raising the last error) at `deadline` (a `time.monotonic()` value) or once
    `stopping` is set. Anything not transient is raised at once: a bug is never retried.
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
        stop=_StopAtDeadline(deadline, stopping),
        sleep=sleep_unless_stopping(stopping),
        before_sleep=before_sleep,
        reraise=True,
    )

    async def attempt() -> T:
        # tenacity awaits only what is declared `async def`; a lambda's coroutine would leak.
        return await operation()

    return await retrying(attempt)


async def cancel_quietly(task: asyncio.Task[Any]) -> None:
    """Cancel a task whose result is no longer wanted; its own error adds nothing. A
    cancellation of the *calling* task (shutdown) still propagates."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:  # noqa: BLE001, S110 - the caller's own error is the one that matters
        pass
