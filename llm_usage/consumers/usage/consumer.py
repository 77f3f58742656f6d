"""The usage consumer: every `llm_usage_recorded` event stored exactly once in Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog
from prometheus_client import CollectorRegistry

from llm_usage.consumers.usage.settle import DecodedBatch, decode_batch, settle_batch
from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import Settings
from llm_usage.runtime.ahead import PreparedAhead
from llm_usage.runtime.outcome import BatchOutcome, Record
from llm_usage.runtime.spec import ConsumerContext, ConsumerSpec
from llm_usage.runtime.tasks import cancel_quietly
from llm_usage.runtime.worker import run_consumer
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.pool import Connection, connection_from
from llm_usage.storage.usage_events import (
    copy_usage_events,
    insert_new_usage_events,
    stored_conflict_fields,
    usage_table_exists,
)
from llm_usage.storage.usage_totals import add_to_daily_totals, daily_totals

log = structlog.get_logger(__name__)


# A batch is landed in chunks so that decoding the next chunk (Python) overlaps with PostgreSQL
# storing the previous one; decoding yields to the event loop every slice so the write (and the
# consumer's heartbeats) keep moving meanwhile.
CHUNK_RECORDS = 1000
_DECODE_SLICE = 200


class UsageRecorder:
    """The usage consumer's batch handler: per chunk, one look-up and one COPY, one transaction.

    The look-up finds the ids already stored (duplicates and conflicts are settled against them);
    the rest are COPYed straight into the table. Should a concurrent replica store one of them
    in between, the COPY fails, the transaction rolls back, and the batch is landed again with
    the race-proof INSERT ... ON CONFLICT DO NOTHING.
    """

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        chunk_records: int = CHUNK_RECORDS,
        keep_daily_totals: bool = True,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._chunk_records = chunk_records
        # Only the benchmark turns this off, to measure what the rollup's pre-aggregate costs.
        self._keep_daily_totals = keep_daily_totals
        self._ahead: PreparedAhead[list[DecodedBatch]] = PreparedAhead(self._decode_chunks)

    def prepare_ahead(self, records: Sequence[Record]) -> None:
        """Decode the next batch while this one lands (the runtime calls it while behind)."""
        self._ahead.start(records)

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome:
        now = self._clock()
        # The chunks decoded so far: all of them when the batch was prepared ahead.
        decoded = await self._ahead.take(records) or []
        async with connection_from(self._pool) as connection:
            try:
                return await self._land(connection, records, decoded, now=now, copy=True)
            except asyncpg.exceptions.UniqueViolationError:
                log.info("Another replica stored some of these ids meanwhile; landing again.")
                return await self._land(connection, records, decoded, now=now, copy=False)

    async def _decode_chunks(self, records: Sequence[Record]) -> list[DecodedBatch]:
        now = self._clock()
        return [
            await _decode_yielding(records[start : start + self._chunk_records], now)
            for start in range(0, len(records), self._chunk_records)
        ]

    async def _land(
        self,
        connection: Connection,
        records: Sequence[Record],
        decoded: list[DecodedBatch],
        *,
        now: datetime,
        copy: bool,
    ) -> BatchOutcome:
        outcome = BatchOutcome()
        stored_now: list[UsageRow] = []
        writing: asyncio.Task[ChunkWritten] | None = None
        async with connection.transaction():
            try:
                for index, start in enumerate(range(0, len(records), self._chunk_records)):
                    if index == len(decoded):
                        decoded.append(
                            await _decode_yielding(
                                records[start : start + self._chunk_records], now
                            )
                        )
                    chunk = decoded[index]
                    if writing is not None:
                        outcome = outcome.merge(_collect(await writing, stored_now))
                    writing = asyncio.create_task(_write_chunk(connection, chunk, copy=copy))
                if writing is not None:
                    outcome = outcome.merge(_collect(await writing, stored_now))
                    writing = None
            finally:
                if writing is not None:  # an error before the last chunk was awaited
                    await cancel_quietly(writing)
            # Once per batch, in key order: the rollup's pre-aggregate moves with the rows.
            if self._keep_daily_totals:
                await add_to_daily_totals(connection, daily_totals(stored_now))
        return outcome


def _collect(written: ChunkWritten, stored_now: list[UsageRow]) -> BatchOutcome:
    stored_now.extend(written.stored)
    return written.outcome


async def _decode_yielding(records: Sequence[Record], now: datetime) -> DecodedBatch:
    batch = DecodedBatch()
    for start in range(0, len(records), _DECODE_SLICE):
        decode_batch(records[start : start + _DECODE_SLICE], now=now, into=batch)
        await asyncio.sleep(0)
    return batch


@dataclass(frozen=True)
class ChunkWritten:
    outcome: BatchOutcome
    stored: list[UsageRow]  # the events this chunk inserted


async def _write_chunk(connection: Connection, batch: DecodedBatch, *, copy: bool) -> ChunkWritten:
    """Store the chunk's new ids and settle every record against what is stored."""
    # Ids already stored come back with the fields that tell a duplicate from a conflict; this
    # sees earlier chunks of the same batch, since they are in the same transaction.
    stored = await stored_conflict_fields(connection, list(batch.occurrences))
    fresh = [e for e in batch.first_occurrences() if e.gateway_request_id not in stored]
    if copy:
        await copy_usage_events(connection, fresh)
        inserted = {event.gateway_request_id for event in fresh}
        stored_now = fresh
    else:
        inserted = await insert_new_usage_events(connection, fresh)
        lost = [e.gateway_request_id for e in fresh if e.gateway_request_id not in inserted]
        stored |= await stored_conflict_fields(connection, lost)
        stored_now = [e for e in fresh if e.gateway_request_id in inserted]
    return ChunkWritten(settle_batch(batch, inserted=inserted, stored=stored), stored_now)


async def require_migrated(pool: asyncpg.Pool) -> None:
    """Refuse to start against a database that was never migrated."""
    async with pool.acquire() as connection:
        if not await usage_table_exists(connection):
            raise ConfigurationError(
                "table llm_usage_events does not exist in DATABASE_URL's database; "
                "run `llm-usage migrate` first"
            )


async def run_usage_consumer(
    settings: Settings,
    *,
    exit_when_idle: float | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """`llm-usage consume usage`: run until SIGTERM/SIGINT, or until idle that long."""
    await run_consumer(
        settings, usage_consumer_spec(settings), exit_when_idle=exit_when_idle, registry=registry
    )


def usage_consumer_spec(settings: Settings) -> ConsumerSpec:
    """The usage consumer as the runtime runs it: its topic, group, handler and DLQ."""

    def make_handler(context: ConsumerContext) -> UsageRecorder:
        return UsageRecorder(pool=context.pool)

    return ConsumerSpec(
        name="usage",
        topic=settings.usage_topic,
        group_id=settings.usage_group_id,
        make_handler=make_handler,
        dead_letter_topic=settings.dlq_topic,
        check_database=require_migrated,
    )
