"""Rows PostgreSQL refuses: one bad row is dead-lettered alone, a refusing database stops.

A row that passed validation can still be refused (a value only the database rejects). If that is
one row among rows that land, it is the row's fault: it is isolated by splitting the batch and
dead-lettered. If the database refuses every new row it is offered, or keeps refusing rows in a
row, the fault is the database's (a broken migration, a new constraint, a full disk): the batch
must not land, no offset may move past it, and it is retried until someone fixes the database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import structlog

from llm_usage.core.errors import TransientError
from llm_usage.runtime.handler import (
    BatchHandler,
    BatchOutcome,
    BatchResult,
    DeadLetter,
    Record,
)
from llm_usage.schemas.dead_letter import DeadLetterReason

log = structlog.get_logger(__name__)

# Errors where PostgreSQL refused a value, not the connection or the statement as a whole.
ROW_REFUSED_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,  # SQLSTATE class 22, raised by the server
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions._base.DataError,  # a value asyncpg could not encode
)

MAX_REFUSALS_IN_A_ROW = 3


class DatabaseRefusesRowsError(TransientError):
    """PostgreSQL refuses rows for a reason of its own; the batch waits for a fix."""


@dataclass
class RefusalGuard:
    """Counts rows refused since the last batch that landed without a refusal."""

    limit: int = MAX_REFUSALS_IN_A_ROW
    in_a_row: int = 0

    def landed_cleanly(self) -> None:
        self.in_a_row = 0

    def refused(self, error: BaseException) -> None:
        """One more refused row; raise once refusals in a row say the database is at fault."""
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            raise _database_at_fault(f"refused {self.in_a_row} rows in a row", error) from error


def _database_at_fault(what: str, error: BaseException) -> DatabaseRefusesRowsError:
    return DatabaseRefusesRowsError(
        f"PostgreSQL {what} ({type(error).__name__}: {error}); this is not bad input: check "
        "the table's constraints, migrations and disk; no offset is committed past these rows"
    )


async def record_isolating_refusals(
    handler: BatchHandler, records: Sequence[Record], guard: RefusalGuard, *, can_dead_letter: bool
) -> BatchOutcome:
    """Land `records`; if PostgreSQL refuses a row, dead-letter it alone (when this consumer has
    a dead-letter sink) unless the refusals show the database itself is at fault."""
    try:
        outcome = await handler.record_batch(records)
    except ROW_REFUSED_ERRORS as error:
        if not can_dead_letter:
            raise DatabaseRefusesRowsError(
                f"PostgreSQL refused a row ({type(error).__name__}: {error}); "
                "this consumer has no dead-letter topic, so it waits for a fix"
            ) from error
        outcome = await _isolate(handler, records, error, guard)
        if outcome.counts[BatchResult.RECORDED] == 0:
            # Duplicates may have "landed", but every new row offered was refused.
            raise _database_at_fault("refused every new row of the batch", error) from error
        return outcome
    guard.landed_cleanly()
    return outcome


async def _isolate(
    handler: BatchHandler,
    records: Sequence[Record],
    error: BaseException,
    guard: RefusalGuard,
) -> BatchOutcome:
    """`records` failed with `error`: dead-letter a lone record, else land each half in turn."""
    if len(records) == 1:
        guard.refused(error)
        record = records[0]
        detail = f"rejected by the database: {type(error).__name__}: {error}"
        log.error(
            "The database refused a record that passed validation; dead-lettering it.",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            detail=detail,
        )
        letter = DeadLetter(record, DeadLetterReason.SCHEMA_VIOLATION, detail[:500])
        counts = Counter({BatchResult.DEAD_LETTERED: 1, BatchResult.REFUSED_BY_DATABASE: 1})
        return BatchOutcome(counts, [letter])
    outcome = BatchOutcome()
    middle = len(records) // 2
    for half in (records[:middle], records[middle:]):
        try:
            landed = await handler.record_batch(half)
        except ROW_REFUSED_ERRORS as half_error:
            landed = await _isolate(handler, half, half_error, guard)
        outcome = outcome.merge(landed)
    return outcome
