"""One replica of many at work at a time: a PostgreSQL advisory lock held on a connection of its
own, so that losing that connection ends the lease at once (the server releases the lock)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
from prometheus_client import Gauge

from llm_usage.core.errors import TransientError
from llm_usage.storage.pool import connect_once


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


@contextlib.asynccontextmanager
async def leadership(
    database_url: str, *, key: int, holder: str, leader: Gauge
) -> AsyncIterator[Lease | None]:
    """Try once to take advisory lock `key`: the lease while held (`leader` reads 1), or None
    while another replica holds it. Leaving closes the connection, which releases the lock."""
    connection = await connect_once(database_url)
    try:
        if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", key):
            yield None
            return
        leader.set(1)
        try:
            yield Lease(connection, holder)
        finally:
            leader.set(0)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 5)
