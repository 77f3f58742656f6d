"""One replica of many at work at a time: a PostgreSQL advisory lock held on a connection of its
own, so that losing that connection ends the lease at once (the server releases the lock).

`lead_while_held` is the loop the alert relay and the rollup schedule share: it keeps one
connection open and asks for the lock on it every few seconds while another replica leads (a
standby does not reconnect each time: eleven standby relays would otherwise open ~5 TLS
connections a second, forever), and opens a new one only when that connection broke.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import structlog
from prometheus_client import Gauge

from llm_usage.core.errors import TransientError
from llm_usage.runtime.retry import is_transient, sleep_unless_stopping
from llm_usage.storage.pool import close_connection, connect_once

log = structlog.get_logger(__name__)

# A lock query that gets no answer (a server that stopped answering) is a broken connection.
_LOCK_QUERY_SECONDS = 10.0


class LostLeadershipError(TransientError):
    """The lease's connection is gone: another replica may lead now."""


@dataclass(frozen=True)
class Lease:
    """The advisory lock, held as long as `connection` stays open."""

    connection: asyncpg.Connection
    holder: str

    def ensure_held(self) -> None:
        """Raise LostLeadershipError once the lock's connection has closed."""
        if self.connection.is_closed():
            raise LostLeadershipError(f"the {self.holder}'s lock connection closed")


@dataclass(frozen=True)
class Leadership:
    """Which lock, who asks for it, and how often."""

    database_url: str
    key: int
    holder: str  # "relay", "scheduler": for log lines and errors
    leader: Gauge  # 1 while this replica leads
    standby_seconds: float  # between tries while another replica leads
    paused: str  # the log line of a transient failure, e.g. "Alert relay paused."
    retry_seconds: float = 1.0  # after a transient failure (the database away, a lost lease)


async def lead_while_held(
    leadership: Leadership,
    stopping: asyncio.Event,
    lead: Callable[[Lease], Awaitable[None]],
    *,
    on_try: Callable[[bool], None] | None = None,
) -> None:
    """Until `stopping`: take the lock when it is free and run `lead` with the lease; while
    another replica holds it, try again every `standby_seconds` on the same connection.

    `on_try(leading)` is called after each try. A transient failure (of `lead`, or of the lock's
    connection) is logged, the lock's connection closed (which releases the lock), and the loop
    goes on after `retry_seconds`; anything else is raised (a bug). Leaving closes the connection.
    """
    sleep = sleep_unless_stopping(stopping)
    connection: asyncpg.Connection | None = None
    try:
        while not stopping.is_set():
            try:
                if connection is None or connection.is_closed():
                    await _close(connection)
                    connection = await connect_once(leadership.database_url)
                leading = bool(
                    await connection.fetchval(
                        "SELECT pg_try_advisory_lock($1)",
                        leadership.key,
                        timeout=_LOCK_QUERY_SECONDS,
                    )
                )
                if on_try is not None:
                    on_try(leading)
                if not leading:
                    await sleep(leadership.standby_seconds)
                    continue
                leadership.leader.set(1)
                try:
                    await lead(Lease(connection, leadership.holder))
                finally:
                    leadership.leader.set(0)
                    # A lead ends with the stop or a failure: the lock goes with its connection.
                    await _close(connection)
                    connection = None
            except Exception as error:
                if not is_transient(error):  # a lost lease is transient: take it again
                    raise
                log.warning(leadership.paused, error=f"{type(error).__name__}: {error}")
                # Whatever broke, the lock is given up with its connection: a new one starts
                # clean (advisory locks stack within a session, so it is never taken twice).
                await _close(connection)
                connection = None
                if on_try is not None:
                    on_try(False)
                await sleep(leadership.retry_seconds)
    finally:
        await _close(connection)


async def _close(connection: asyncpg.Connection | None) -> None:
    if connection is not None:
        await close_connection(connection)
