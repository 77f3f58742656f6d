"""The budget consumer's batch handler: count each event once, add it to every counter it
touches, decide the alerts it crosses, and end the budget-check holds of the events it counted —
all in one transaction."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
from prometheus_client import CollectorRegistry

from llm_usage.consumers.budget.corrections import (
    BATCH_RESULTS,
    BUDGET,
    DEFERRED,
    PlannedCorrections,
    Received,
    plan_corrections,
)
from llm_usage.consumers.budget.hold_outcomes import observe_ended_holds
from llm_usage.consumers.budget.metrics import HoldMetrics
from llm_usage.consumers.budget.spend import add_and_alert
from llm_usage.core.faults import crash_here
from llm_usage.core.settings import Settings
from llm_usage.domain.corrections import Correction
from llm_usage.domain.period_charges import PeriodCharge
from llm_usage.domain.periods import utc_day
from llm_usage.runtime.ahead import PreparedAhead
from llm_usage.runtime.correction_metrics import CorrectionMetrics, correction_metrics
from llm_usage.runtime.handler import BatchOutcome, BatchResult, Record
from llm_usage.runtime.pricing import PriceBook, PriceSnapshot
from llm_usage.schemas.dead_letter import Rejection
from llm_usage.schemas.decoding import decode_usage_topic_record
from llm_usage.schemas.usage_event import UnpricedEvent, UsageRow
from llm_usage.storage.budget_corrections import record_applied
from llm_usage.storage.budget_holds import EndedHold, release_counted_holds
from llm_usage.storage.budget_spend import StagedEvent, count_staged_events, stage_events
from llm_usage.storage.corrections import (
    Waiting,
    forget_waits,
    lock_correction_buckets,
    park,
)
from llm_usage.storage.flavour import Flavour
from llm_usage.storage.hold_presence import any_open_hold
from llm_usage.storage.pool import Connection, connection_from

# Records decoded between two yields to the event loop.
_DECODE_SLICE = 250
# Until the settings say otherwise: how long a parked correction may wait for its verdict.
CORRECTION_WAIT_SECONDS = Settings.model_fields["correction_wait_seconds"].default
# Between counting a batch and ending its holds, before COMMIT (tests crash here).
FAULT_BEFORE_HOLD_RELEASE = "budget_between_count_and_release"


def decode_for_counting(
    records: Sequence[Record],
    *,
    now: datetime,
    prices: PriceSnapshot,
    events: dict[str, UsageRow],
    counts: Counter[BatchResult],
    corrections: list[Received],
) -> None:
    """Add the records' valid events to `events`, one per id (the first), their corrections to
    `corrections` (in order), and count what became of the others.

    The usage consumer's own rules decide validity: what it would dead-letter never counts (the
    usage consumer, not this one, writes the DLQ).
    """
    for record in records:
        decoded = decode_usage_topic_record(record.value, now=now)
        if isinstance(decoded, UnpricedEvent):
            decoded = prices.price(record, decoded)
        if isinstance(decoded, Rejection):
            counts[BatchResult.REJECTED] += 1
        elif isinstance(decoded, PeriodCharge):  # billed by the rollup, never spend
            continue
        elif isinstance(decoded, Correction):
            corrections.append(Received(decoded, record))
        elif decoded.gateway_request_id in events:
            counts[BatchResult.DUPLICATE] += 1
        else:
            events[decoded.gateway_request_id] = decoded


@dataclass(frozen=True)
class _Decoded:
    events: dict[str, UsageRow]  # the first valid event of each id
    corrections: list[Received]  # every correction, in order
    counts: Counter[BatchResult]  # what became of the others


class BudgetCounter:
    """Lands a batch in one transaction: the new ids, the counters, the alerts they cross, the
    holds of the newly counted ids ended."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        clock: Callable[[], datetime],
        holds: HoldMetrics | None = None,
        corrections: CorrectionMetrics | None = None,
        correction_wait_seconds: float = CORRECTION_WAIT_SECONDS,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._holds = holds or HoldMetrics.create(CollectorRegistry())
        self._corrections = corrections or correction_metrics(CollectorRegistry(), "budget")
        self._correction_wait_seconds = correction_wait_seconds
        self._flavour = Flavour()  # a Citus coordinator or one node: asked once
        self._prices = PriceBook(pool)
        self._ahead: PreparedAhead[_Decoded] = PreparedAhead(self._decode)

    def prepare_ahead(self, records: Sequence[Record]) -> None:
        """Decode the next batch while this one lands (the runtime calls it while behind)."""
        self._ahead.start(records)

    async def _decode(self, records: Sequence[Record]) -> _Decoded:
        prices = await self._prices.ready(records)
        now = self._clock()
        events: dict[str, UsageRow] = {}
        corrections: list[Received] = []
        counts: Counter[BatchResult] = Counter()
        for start in range(0, len(records), _DECODE_SLICE):
            decode_for_counting(
                records[start : start + _DECODE_SLICE],
                now=now,
                prices=prices,
                events=events,
                counts=counts,
                corrections=corrections,
            )
            await asyncio.sleep(0)  # the alert relay and heartbeats share this event loop
        return _Decoded(events, corrections, counts)

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome:
        decoded = await self._ahead.take(records) or await self._decode(records)
        now = self._clock()
        events, corrections, counts = decoded.events, decoded.corrections, decoded.counts
        if not events and not corrections:
            return BatchOutcome(counts)
        new_events: list[UsageRow] = []
        corrected: list[str] = []
        async with connection_from(self._pool) as connection, connection.transaction():
            if corrections:  # the first locks of the transaction (design §7)
                await lock_correction_buckets(connection, (c.correction.event for c in corrections))
            if events:
                new_events = await self._count(connection, events, counts)
            # After the count: a correction may follow its event in the same batch.
            planned = await self._plan(connection, corrections, now=now) if corrections else None
            moves = planned.moves if planned is not None else []
            if new_events or moves:  # one addition for both: a counter is written once
                await add_and_alert(connection, new_events, moves, now=now)
            if planned is not None:
                await record_applied(connection, planned.applied, now=now)
                corrected = planned.results
            # Last, so the holds' counter rows (which every check locks) are held only for the
            # moment before COMMIT, not while the spend counters are upserted.
            crash_here(FAULT_BEFORE_HOLD_RELEASE)
            ended: list[EndedHold] = []
            if new_events and await any_open_hold(connection):
                counted = [
                    (event.tenant_id, event.gateway_request_id, event.customer_charge_usd)
                    for event in new_events
                ]
                ended = await release_counted_holds(connection, counted, now=now)
        self._report(ended, events)
        for result, n in Counter(corrected).items():
            counts[BATCH_RESULTS[result]] += n
            self._corrections.count(result, n)
        return BatchOutcome(counts)

    async def _count(
        self, connection: Connection, events: dict[str, UsageRow], counts: Counter[BatchResult]
    ) -> list[UsageRow]:
        """Count the events not counted before, leaving them staged for the counters; return
        them."""
        await stage_events(connection, map(_staged, events.values()))
        citus = await self._flavour.citus(connection)
        counted_before = await count_staged_events(connection, citus=citus)
        counts[BatchResult.RECORDED] += len(events) - len(counted_before)
        counts[BatchResult.DUPLICATE] += len(counted_before)
        return [event for request_id, event in events.items() if request_id not in counted_before]

    async def _plan(
        self, connection: Connection, corrections: list[Received], *, now: datetime
    ) -> PlannedCorrections:
        """Judge the batch's corrections and plan their moves; park those that must wait,
        forget the parked copies of the others."""
        citus = await self._flavour.citus(connection)
        planned = await plan_corrections(connection, corrections, citus=citus)
        until = now + timedelta(seconds=self._correction_wait_seconds)
        waiting: list[Waiting] = []
        for item, result in zip(corrections, planned.results, strict=True):
            if result == DEFERRED:
                assert item.record is not None  # a batch's corrections come from its records
                waiting.append(
                    Waiting.of(item.record, item.correction, first_seen_at=now, wait_until=until)
                )
        await park(connection, BUDGET, waiting)
        waits = {(w.tenant_id, w.correction_id) for w in waiting}
        resolved = {item.correction.key for item in corrections} - waits
        await forget_waits(connection, BUDGET, sorted(resolved))
        return planned

    def _report(self, ended: Sequence[EndedHold], events: dict[str, UsageRow]) -> None:
        """Count the committed batch's settled holds; an event's day only for those."""
        event_days = {
            hold.gateway_request_id: utc_day(events[hold.gateway_request_id].occurred_at)
            for hold in ended
        }
        observe_ended_holds(ended, self._holds, event_days=event_days)


def _staged(event: UsageRow) -> StagedEvent:
    return (
        event.gateway_request_id,
        event.tenant_id,
        event.deployment_id,
        event.user_id,
        event.agent_id,
        event.occurred_at.date(),  # decoding put it in UTC: the event's own UTC day
        event.customer_charge_usd,
        event.input_tokens,
        event.output_tokens,
        event.cached_input_tokens,
        event.reasoning_tokens,
        event.total_tokens,
        event.occurred_at,
    )
