"""Which PostgreSQL the workers talk to: a single node, or a Citus coordinator.

The workers run unchanged against either (no setting says which): each asks once, per pool,
whether the `citus` extension is installed, and picks the few statements Citus plans
differently (docs/scaling.md, "Limits found"). The single-node forms stay the default: the
forms Citus accepts are several times slower on one node.
"""

from __future__ import annotations

import asyncpg

from llm_usage.storage.pool import Connection


async def citus_installed(connection: Connection) -> bool:
    """The `citus` extension is installed in this database."""
    return bool(await connection.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'citus'"))


class Flavour:
    """Whether a pool's database is a Citus coordinator, asked once: a worker's handler keeps
    one beside its pool (a pool is on one database for its life)."""

    def __init__(self) -> None:
        self._citus: bool | None = None

    async def citus(self, connection: Connection) -> bool:
        """Asked through `connection` (one of the pool's) the first time only."""
        if self._citus is None:
            self._citus = await citus_installed(connection)
        return self._citus


def is_unique_violation(error: BaseException, *, citus: bool) -> bool:
    """`error` says a unique key was violated. On Citus a COPY through the coordinator reports
    a worker's unique violation as SQLSTATE XX000 (internal error), with PostgreSQL's message,
    not as 23505: on Citus that is a unique violation too."""
    if isinstance(error, asyncpg.exceptions.UniqueViolationError):
        return True
    return (
        citus
        and isinstance(error, asyncpg.exceptions.InternalServerError)
        and "duplicate key value violates unique constraint" in str(error)
    )
