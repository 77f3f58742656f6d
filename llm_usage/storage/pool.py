"""The asyncpg pool every worker shares, and the one clear line when it cannot be had."""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from llm_usage.core.errors import ConfigurationError, ServiceUnreachableError, TransientError

# What query functions accept: a plain connection or one borrowed from the pool.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

# Errors that mean "the database is not there (yet)", as opposed to "your query is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable host, missing unix socket
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08: the connection broke
    asyncpg.exceptions.CannotConnectNowError,  # starting up or shutting down
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    TimeoutError,
)
_UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.exceptions.PostgresError,
)


class DatabaseUnavailableError(TransientError):
    """No connection could be had: the server is restarting, failing over, or unreachable."""


@asynccontextmanager
async def connection_from(
    pool: asyncpg.Pool,
) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
    """Borrow a connection. Failing to open one (any socket error, e.g. a unix socket that is
    gone while the server restarts) or losing it mid-use is a DatabaseUnavailableError, which
    workers retry."""
    try:
        connection = await pool.acquire()
    except _UNREACHABLE_ERRORS as error:
        raise DatabaseUnavailableError(
            f"cannot open a database connection: {type(error).__name__}: {error}"
        ) from error
    try:
        yield connection
    except asyncpg.InterfaceError as error:
        # The server went away mid-transaction: asyncpg then reports the transaction's exit
        # ("the underlying connection is closed"), not the loss itself. The connection's own
        # state, not the message, says which it is.
        if _is_gone(connection):
            raise DatabaseUnavailableError(
                f"the database connection was lost: {type(error).__name__}: {error}"
            ) from error
        if _is_stuck(error):
            # A query cancelled while the server went away (a COPY beside the batch's
            # transaction) leaves the protocol mid-operation: the connection cannot roll back
            # or be reused. Drop it; the batch is retried on a fresh one.
            connection.terminate()
            raise DatabaseUnavailableError(
                f"the database connection was left mid-operation: {error}"
            ) from error
        raise
    finally:
        await pool.release(connection)


@asynccontextmanager
async def snapshot_from(
    pool: asyncpg.Pool,
) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
    """Borrow a connection (as `connection_from`) inside a read-only REPEATABLE READ
    transaction: every read through it sees the same snapshot, so figures read one after the
    other agree with each other even while events arrive."""
    async with (
        connection_from(pool) as connection,
        connection.transaction(isolation="repeatable_read", readonly=True),
    ):
        yield connection


def _is_stuck(error: asyncpg.InterfaceError) -> bool:
    """asyncpg's own words for a connection whose previous operation never finished."""
    return "another operation is in progress" in str(error)


def _is_gone(connection: PoolConnectionProxy[asyncpg.Record]) -> bool:
    """Closed, or already detached from its proxy by the pool because it was lost."""
    try:
        return connection.is_closed()
    except asyncpg.InterfaceError:  # "released back to the pool": the pool dropped it
        return True


async def connect_once(dsn: str) -> asyncpg.Connection[asyncpg.Record]:
    """A connection of its own (for a lock or LISTEN that must not go back to a pool); failing
    to open one is a DatabaseUnavailableError, which workers retry."""
    try:
        return await asyncpg.connect(
            dsn, timeout=10, server_settings={"application_name": "llm-usage"}
        )
    except _UNREACHABLE_ERRORS as error:
        raise DatabaseUnavailableError(
            f"cannot open a database connection: {type(error).__name__}: {error}"
        ) from error


async def close_connection(connection: asyncpg.Connection, *, seconds: float = 1.0) -> None:
    """Close a connection of its own: gracefully if the server answers within `seconds`, else
    (or when cancelled) by dropping the socket, which ends the server's session just as well
    (its locks and LISTENs go with it). Never raises, except the cancellation itself."""
    try:
        await asyncio.wait_for(connection.close(), seconds)
    except asyncio.CancelledError:
        connection.terminate()
        raise
    except Exception:  # noqa: BLE001 - a server that does not answer: drop the socket
        connection.terminate()


async def create_pool(dsn: str, *, size: int = 4) -> asyncpg.Pool:
    """Open a pool of `size` connections; an unreachable database is a person-fixable error."""
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            timeout=10,
            # A server that stops answering becomes a retried TimeoutError, not a hung batch.
            command_timeout=60,
            server_settings={"application_name": "llm-usage"},
        )
    except ssl.SSLCertVerificationError as error:  # a ValueError too: caught first
        raise ConfigurationError(
            f"PostgreSQL at {_redacted(dsn)} presented a certificate that is not trusted "
            f"({_one_line(error)}); set sslrootcert in DATABASE_URL to the CA that signed it "
            "and use the host name its certificate carries"
        ) from None
    except (ValueError, asyncpg.exceptions.ClientConfigurationError) as error:
        raise ConfigurationError(
            f"DATABASE_URL is not a usable PostgreSQL URL ({_one_line(error)}); "
            "expected postgresql://user:password@host:port/database"
        ) from None
    except asyncpg.exceptions.InvalidCatalogNameError as error:
        raise ServiceUnreachableError(
            f"database does not exist ({_one_line(error)}); create it or fix DATABASE_URL"
        ) from None
    except asyncpg.exceptions.InvalidAuthorizationSpecificationError as error:
        raise ServiceUnreachableError(
            f"database refused the login ({_one_line(error)}); "
            "fix the user or password in DATABASE_URL"
        ) from None
    except _UNREACHABLE_ERRORS as error:
        raise ServiceUnreachableError(
            f"cannot reach PostgreSQL at {_redacted(dsn)} ({_one_line(error)}); "
            "start it (`llm-usage dev up`) or point DATABASE_URL at a running server"
        ) from None
    if pool is None:  # asyncpg types the result as optional
        raise ServiceUnreachableError(f"cannot open a pool to {_redacted(dsn)}")
    return pool


_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


def _redacted(dsn: str) -> str:
    """The DSN without its password (in the user part or as a parameter), for error messages."""
    dsn = _PASSWORD_PARAMETER.sub(r"\1***", dsn)
    scheme, sep, rest = dsn.partition("://")
    if not sep or "@" not in rest:
        return dsn
    credentials, _, location = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{location}"


def _one_line(error: BaseException) -> str:
    """asyncpg's messages may carry a DETAIL or HINT line: one line for people."""
    return " ".join(str(error).split()) or type(error).__name__
