"""The budget tables as `llm-usage policy` and `llm-usage budget` reach them: one connection
whose faults a person can fix end in one line, and an aligned text table to print rows in."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from llm_usage.core.errors import ServiceUnreachableError, UserFacingError

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings
    from llm_usage.storage.pool import Connection


@asynccontextmanager
async def budget_tables(
    settings: Settings, *, tables: str = "budget tables"
) -> AsyncIterator[Connection]:
    """One connection; what a person can fix about the database becomes one line (naming
    `tables`, what the command reads and changes)."""
    import asyncpg  # noqa: PLC0415 - the database stack, when a command runs

    from llm_usage.storage.pool import CONNECTION_ERRORS, create_pool  # noqa: PLC0415

    pool = await create_pool(settings.database_url, size=1)
    try:
        async with pool.acquire() as connection:
            yield connection
    except (asyncpg.exceptions.UndefinedTableError, asyncpg.exceptions.UndefinedColumnError):
        raise UserFacingError(
            f"the database has no {tables} yet; run `llm-usage migrate` first"
        ) from None
    except asyncpg.exceptions.InsufficientPrivilegeError as error:
        raise UserFacingError(
            f"the database user may not do this ({error}); use a user that may read and "
            f"change the {tables}"
        ) from None
    except asyncpg.exceptions.ReadOnlySQLTransactionError:
        raise UserFacingError(
            "the database is read-only (a standby?); point DATABASE_URL at the primary"
        ) from None
    except CONNECTION_ERRORS as error:
        raise ServiceUnreachableError(
            f"lost the connection to PostgreSQL ({error or type(error).__name__}); try again "
            "once it is back (nothing was changed unless the command said so)"
        ) from None
    finally:
        await pool.close()


def aligned_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: set[int]) -> str:
    """An aligned table; columns in `right` are aligned right (numbers)."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for cells in (headers, *rows):
        padded = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)
