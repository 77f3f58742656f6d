"""The usage consumer: every `llm_usage_recorded` event stored exactly once in Postgres."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import asyncpg

from consumers.runtime.loop import BatchOutcome, Record
from consumers.runtime.worker import run_consumer
from consumers.usage_batch import decode_batch, settle_batch
from llm_usage.errors import ConfigurationError
from llm_usage.settings import Settings
from storage.usage_events import (
    copy_usage_events,
    insert_new_usage_events,
    stored_conflict_fields,
    usage_table_exists,
)


class UsageRecorder:
    """The usage consumer's batch handler: one look-up and one COPY per batch.

    The look-up finds the ids already stored (duplicates and conflicts are settled against them);
    the rest are COPYed straight into the table. Should a concurrent replica store one of them
    in between, the COPY fails whole and the race-proof INSERT ... ON CONFLICT path takes over.
    """

    def __init__(
        self, *, pool: asyncpg.Pool, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._pool = pool
        self._clock = clock

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome:
        batch = decode_batch(records, now=self._clock())
        async with self._pool.acquire() as connection:
            # Ids already stored come back with the fields that tell a duplicate from a conflict.
            stored = await stored_conflict_fields(connection, list(batch.occurrences))
            fresh = [e for e in batch.first_occurrences() if e.gateway_request_id not in stored]
            try:
                await copy_usage_events(connection, fresh)
                inserted = {event.gateway_request_id for event in fresh}
            except asyncpg.exceptions.UniqueViolationError:
                # Another replica stored one of these ids after our look-up; the COPY kept
                # nothing. INSERT ... ON CONFLICT DO NOTHING settles the race row by row.
                inserted = await insert_new_usage_events(connection, fresh)
                lost = [e.gateway_request_id for e in fresh if e.gateway_request_id not in inserted]
                stored |= await stored_conflict_fields(connection, lost)
        return settle_batch(batch, inserted=inserted, stored=stored)


async def require_migrated(pool: asyncpg.Pool) -> None:
    """Refuse to start against a database that was never migrated."""
    async with pool.acquire() as connection:
        if not await usage_table_exists(connection):
            raise ConfigurationError(
                "table llm_usage_events does not exist in DATABASE_URL's database; "
                "run `llm-usage migrate` first"
            )


async def run_usage_consumer(settings: Settings, *, exit_when_idle: float | None = None) -> None:
    """`llm-usage consume usage`: run until SIGTERM/SIGINT, or until idle that long."""
    await run_consumer(
        settings,
        name="usage",
        topic=settings.usage_topic,
        group_id=settings.usage_group_id,
        make_handler=lambda pool: UsageRecorder(pool=pool),
        check_database=require_migrated,
        exit_when_idle=exit_when_idle,
    )
