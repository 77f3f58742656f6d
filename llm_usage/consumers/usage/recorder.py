"""The usage consumer's batch handler: each batch's new events stored in one transaction, with
the daily aggregates they add to, and every record settled against what is stored."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime

import asyncpg
import structlog
from prometheus_client import Counter

from llm_usage.consumers.usage.corrections import (
    apply_corrections,
    count_corrections,
    move_aggregates,
)
from llm_usage.consumers.usage.period_charges import record_period_charges
from llm_usage.consumers.usage.price_drift import count_drift
from llm_usage.consumers.usage.settle import (
    ChunkPlan,
    DecodedBatch,
    decode_batch,
    lookup_keys,
    plan_chunk,
    settle_batch,
)
from llm_usage.core.faults import crash_here
from llm_usage.runtime.ahead import PreparedAhead
from llm_usage.runtime.correction_metrics import CorrectionMetrics
from llm_usage.runtime.handler import BatchOutcome, Record
from llm_usage.runtime.isolation import DatabaseRefusesRowsError
from llm_usage.runtime.pricing import PriceBook, PriceSnapshot
from llm_usage.runtime.retry import cancel_quietly
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.event_ids import (
    copy_new_ids,
    insert_new_ids,
    look_up_identities,
    look_up_window_first,
)
from llm_usage.storage.flavour import Flavour, is_unique_violation
from llm_usage.storage.partitions import attached_months
from llm_usage.storage.pool import Connection, connection_from
from llm_usage.storage.usage_dimensions import add_to_daily_dimensions, daily_dimensions
from llm_usage.storage.usage_events import copy_usage_events, insert_new_usage_events
from llm_usage.storage.usage_totals import add_to_daily_totals, daily_totals

log = structlog.get_logger(__name__)


# A batch is landed in chunks so that decoding the next chunk (Python) overlaps with PostgreSQL
# storing the previous one; decoding yields to the event loop every slice so the write (and the
# consumer's heartbeats) keep moving meanwhile.
CHUNK_RECORDS = 1000

LANDING_AGAIN = (
    "Another worker stored some of these ids meanwhile, or an event older than the id window "
    "came again; landing again."
)
_DECODE_SLICE = 200


# What a COPY that met an id stored meanwhile raises (on Citus: XX000, storage/flavour.py).
_UNIQUE_VIOLATIONS = (
    asyncpg.exceptions.UniqueViolationError,
    asyncpg.exceptions.InternalServerError,
)


class MonthWithoutPartitionError(DatabaseRefusesRowsError):
    """An event's month has no partition: dropped meanwhile (the batch, landed again, finds it
    expired) or never created (`llm-usage maintain` has not run: the batch waits for it)."""


class UsageRecorder:
    """The usage consumer's batch handler: per chunk, a look-up and two COPYs, one transaction.

    The look-up finds what the window knows of the chunk's ids, and for the ids it knows what
    Tier 1 holds (duplicates and conflicts are settled against it); the new ids are COPYed into
    the window and the events to store into the table. Should a concurrent replica (or the budget
    consumer) add one of them in between, or a copy be of an event stored before the window, a
    COPY fails, the transaction rolls back, and the batch is landed again with a look-up of both
    tiers for every id and the race-proof INSERT ... ON CONFLICT DO NOTHING.
    """

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        clock: Callable[[], datetime],
        chunk_records: int = CHUNK_RECORDS,
        price_drift: Counter | None = None,
        correction_wait_seconds: float = 900.0,
        correction_metrics: CorrectionMetrics | None = None,
    ) -> None:
        self._pool = pool
        self._correction_wait_seconds = correction_wait_seconds
        self._correction_metrics = correction_metrics
        self._price_drift = price_drift
        self._clock = clock
        self._chunk_records = chunk_records
        self._flavour = Flavour()  # a Citus coordinator or one node: asked once
        self._prices = PriceBook(pool)
        self._ahead: PreparedAhead[list[DecodedBatch]] = PreparedAhead(self._decode_chunks)

    def prepare_ahead(self, records: Sequence[Record]) -> None:
        """Decode the next batch while this one lands (the runtime calls it while behind)."""
        self._ahead.start(records)

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome:
        now = self._clock()
        # The chunks decoded so far: all of them when the batch was prepared ahead.
        decoded = await self._ahead.take(records) or []
        # Read before the batch's connection is taken: reading them may take a connection of its
        # own, and replicas holding one each while waiting for another would exhaust a small pool.
        prices = await self._prices.ready(records)
        async with connection_from(self._pool) as connection:
            citus = await self._flavour.citus(connection)
            try:
                try:
                    return await self._land(
                        connection, records, decoded, prices, now=now, copy=True, citus=citus
                    )
                except _UNIQUE_VIOLATIONS as error:
                    if not is_unique_violation(error, citus=citus):
                        raise
                    log.info(LANDING_AGAIN)
                    return await self._land(
                        connection, records, decoded, prices, now=now, copy=False, citus=citus
                    )
            except asyncpg.exceptions.CheckViolationError as error:
                if "no partition of relation" not in str(error):
                    raise
                raise MonthWithoutPartitionError(
                    f"PostgreSQL has no partition for an event's month ({error}): a month was "
                    "dropped meanwhile (landing again finds its events expired) or the months "
                    "ahead were never created (run `llm-usage maintain` as the schema owner)"
                ) from error

    async def _decode_chunks(self, records: Sequence[Record]) -> list[DecodedBatch]:
        prices = await self._prices.ready(records)
        now = self._clock()
        return [
            await _decode_yielding(records[start : start + self._chunk_records], now, prices)
            for start in range(0, len(records), self._chunk_records)
        ]

    async def _land(
        self,
        connection: Connection,
        records: Sequence[Record],
        decoded: list[DecodedBatch],
        prices: PriceSnapshot,  # for the chunks not decoded ahead
        *,
        now: datetime,
        copy: bool,
        citus: bool = False,
    ) -> BatchOutcome:
        outcome = BatchOutcome()
        stored_now: list[UsageRow] = []
        writing: asyncio.Task[ChunkWritten] | None = None
        async with connection.transaction():
            floor = (await attached_months(connection)).oldest
            try:
                for index, start in enumerate(range(0, len(records), self._chunk_records)):
                    if index == len(decoded):
                        decoded.append(
                            await _decode_yielding(
                                records[start : start + self._chunk_records], now, prices
                            )
                        )
                    chunk = decoded[index]
                    if writing is not None:
                        outcome = outcome.merge(_collect(await writing, stored_now))
                    writing = asyncio.create_task(
                        _write_chunk(connection, chunk, floor, copy=copy, citus=citus)
                    )
                if writing is not None:
                    outcome = outcome.merge(_collect(await writing, stored_now))
                    writing = None
            finally:
                if writing is not None:  # an error before the last chunk was awaited
                    await cancel_quietly(writing)
            corrections = [copy for chunk in decoded for copy in chunk.corrections]
            applied = None
            if corrections:  # after the events (it may correct one of them), before the sums
                applied = await apply_corrections(
                    connection,
                    corrections,
                    now=now,
                    wait_seconds=self._correction_wait_seconds,
                    citus=citus,
                )
                outcome = outcome.merge(applied.outcome)
                await move_aggregates(connection, stored_now, applied)
            else:
                await self._add_to_daily_totals(connection, stored_now)
            charges = [copy for chunk in decoded for copy in chunk.period_charges]
            outcome = outcome.merge(await record_period_charges(connection, charges))
            if applied is not None:
                crash_here("usage_corrections_written")
        if self._price_drift is not None:  # committed: each stored event is checked once
            count_drift(stored_now, prices.rows, self._price_drift)
        if applied is not None and self._correction_metrics is not None:
            count_corrections(self._correction_metrics, applied)
        return outcome

    async def _add_to_daily_totals(self, connection: Connection, stored: list[UsageRow]) -> None:
        """Once per batch, in key order: the rollup's and the reports' pre-aggregates move
        with the rows (the dimensions under the month locks the totals took)."""
        await add_to_daily_totals(connection, daily_totals(stored))
        await add_to_daily_dimensions(connection, daily_dimensions(stored))


def _collect(written: ChunkWritten, stored_now: list[UsageRow]) -> BatchOutcome:
    stored_now.extend(written.stored)
    return written.outcome


async def _decode_yielding(
    records: Sequence[Record], now: datetime, prices: PriceSnapshot
) -> DecodedBatch:
    batch = DecodedBatch()
    for start in range(0, len(records), _DECODE_SLICE):
        decode_batch(records[start : start + _DECODE_SLICE], now=now, prices=prices, into=batch)
        await asyncio.sleep(0)
    return batch


@dataclass(frozen=True)
class ChunkWritten:
    outcome: BatchOutcome
    stored: list[UsageRow]  # the events this chunk inserted


async def _write_chunk(
    connection: Connection,
    batch: DecodedBatch,
    floor: date | None,
    *,
    copy: bool,
    citus: bool = False,
) -> ChunkWritten:
    """Store the chunk's first copies and settle every record against what is known."""
    # This sees earlier chunks of the same batch: they are in the same transaction. The fast path
    # asks Tier 1 only about the ids the window knows: a copy of an event older than the window
    # then fails the events' COPY, and the batch is landed again on the path that asks both tiers.
    look_up = look_up_window_first if copy else look_up_identities
    known = await look_up(connection, lookup_keys(batch), citus=citus)
    plan = plan_chunk(batch, known, retention_floor=floor)
    if copy:
        await copy_new_ids(connection, plan.new_in_window)
        await copy_usage_events(connection, plan.to_store)
        inserted = {event.gateway_request_id for event in plan.to_store}
        stored_now = plan.to_store
    else:
        await _add_ids_racing(connection, batch, plan, floor, citus=citus)
        inserted = await insert_new_usage_events(connection, plan.to_store)
        met = [e.gateway_request_id for e in plan.to_store if e.gateway_request_id not in inserted]
        if met:  # another replica stored the same key meanwhile: judged against its row
            await _plan_again(connection, batch, plan, floor, met, citus=citus)
        stored_now = [e for e in plan.to_store if e.gateway_request_id in inserted]
    return ChunkWritten(settle_batch(batch, plan, inserted=inserted), stored_now)


async def _add_ids_racing(
    connection: Connection,
    batch: DecodedBatch,
    plan: ChunkPlan,
    floor: date | None,
    *,
    citus: bool = False,
) -> None:
    """Add the new ids to the window; an id another transaction added first (it committed: the
    insert waited for it) is planned again against that transaction's row."""
    new = plan.new_in_window
    added = await insert_new_ids(connection, new)
    lost = [event.gateway_request_id for event in new if event.gateway_request_id not in added]
    if lost:
        await _plan_again(connection, batch, plan, floor, lost, citus=citus)


async def _plan_again(
    connection: Connection,
    batch: DecodedBatch,
    plan: ChunkPlan,
    floor: date | None,
    ids: list[str],
    *,
    citus: bool = False,
) -> None:
    """Plan `ids` again from what both tiers hold now."""
    again = DecodedBatch({i: batch.occurrences[i] for i in ids})
    known = await look_up_identities(connection, lookup_keys(again), citus=citus)
    plan.replan(plan_chunk(again, known, retention_floor=floor))
