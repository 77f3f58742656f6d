"""The budget consumer's batch handler: count each event once, add it to every counter it
touches, and decide the alerts it crosses — all in one transaction."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from llm_usage.consumers.budget.counting import contributions_to
from llm_usage.consumers.budget.crossing import Contribution, Crossing, crossings_by_events
from llm_usage.runtime.ahead import PreparedAhead
from llm_usage.runtime.outcome import BatchOutcome, BatchResult, Record
from llm_usage.schemas.budget import (
    AlertLevel,
    BudgetAlert,
    CounterKey,
    SpendKey,
    alert_threshold_pct,
    threshold_usd,
)
from llm_usage.schemas.dead_letter import Rejection
from llm_usage.schemas.decoding import decode_usage_event
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.budget_outbox import insert_alerts
from llm_usage.storage.budget_spend import (
    LimitedCounter,
    StagedEvent,
    add_staged_to_counters,
    count_staged_events,
    stage_events,
)
from llm_usage.storage.pool import connection_from

# Records decoded between two yields to the event loop.
_DECODE_SLICE = 250


def decode_for_counting(
    records: Sequence[Record],
    *,
    now: datetime,
    events: dict[str, UsageRow],
    counts: Counter[BatchResult],
) -> None:
    """Add the records' valid events to `events`, one per id (the first), and count what
    became of the others.

    The usage consumer's own rules decide validity: what it would dead-letter never counts (the
    usage consumer, not this one, writes the DLQ).
    """
    for record in records:
        decoded = decode_usage_event(record.value, now=now)
        if isinstance(decoded, Rejection):
            counts[BatchResult.REJECTED] += 1
        elif decoded.gateway_request_id in events:
            counts[BatchResult.DUPLICATE] += 1
        else:
            events[decoded.gateway_request_id] = decoded


def alert_for(
    key: CounterKey,
    crossing: Crossing,
    *,
    limit_usd: Decimal,
    warn_threshold_pct: int,
    emitted_at: datetime,
) -> BudgetAlert:
    """The alert v1 for a crossing of `key`'s counter against a limit."""
    return BudgetAlert(
        alert_id=key.alert_id(crossing.level, limit_usd),
        tenant_id=key.tenant_id,
        scope_type=key.scope_type,
        scope_id=key.scope_id,
        window=key.window,
        period_start=key.period_start,
        level=crossing.level,
        spend_usd=crossing.spend_usd,
        limit_usd=limit_usd,
        threshold_pct=alert_threshold_pct(crossing.level, warn_threshold_pct),
        triggered_by=crossing.triggered_by,
        emitted_at=emitted_at,
    )


@dataclass(frozen=True)
class _Decoded:
    events: dict[str, UsageRow]  # the first valid event of each id
    counts: Counter[BatchResult]  # what became of the others


class BudgetCounter:
    """Lands a batch in one transaction: the new ids, the counters, the alerts they cross."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._ahead: PreparedAhead[_Decoded] = PreparedAhead(self._decode)

    def prepare_ahead(self, records: Sequence[Record]) -> None:
        """Decode the next batch while this one lands (the runtime calls it while behind)."""
        self._ahead.start(records)

    async def _decode(self, records: Sequence[Record]) -> _Decoded:
        now = self._clock()
        events: dict[str, UsageRow] = {}
        counts: Counter[BatchResult] = Counter()
        for start in range(0, len(records), _DECODE_SLICE):
            decode_for_counting(
                records[start : start + _DECODE_SLICE], now=now, events=events, counts=counts
            )
            await asyncio.sleep(0)  # the alert relay and heartbeats share this event loop
        return _Decoded(events, counts)

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome:
        decoded = await self._ahead.take(records) or await self._decode(records)
        now = self._clock()
        events, counts = decoded.events, decoded.counts
        if not events:
            return BatchOutcome(counts)
        async with connection_from(self._pool) as connection, connection.transaction():
            await stage_events(connection, map(_staged, events.values()))
            counted_before = await count_staged_events(connection)
            counts[BatchResult.RECORDED] += len(events) - len(counted_before)
            counts[BatchResult.DUPLICATE] += len(counted_before)
            if len(counted_before) == len(events):
                return BatchOutcome(counts)
            limited = await add_staged_to_counters(connection)
            crossing = {key: counter for key, counter in limited.items() if _may_cross(counter)}
            if crossing:
                # Which event crossed: the batch's new events, in order, on the counters that
                # cross (a handful in a batch of thousands).
                contributions = contributions_to(
                    crossing,
                    (
                        event
                        for request_id, event in events.items()
                        if request_id not in counted_before
                    ),
                )
                await insert_alerts(
                    connection, alerts_crossed(contributions, crossing, emitted_at=now)
                )
        return BatchOutcome(counts)


def _staged(event: UsageRow) -> StagedEvent:
    return (
        event.gateway_request_id,
        event.tenant_id,
        event.deployment_id,
        event.user_id,
        event.agent_id,
        event.occurred_at.date(),  # decoding put it in UTC: the event's own UTC day
        event.customer_charge_usd,
    )


def alerts_crossed(
    contributions: Mapping[SpendKey, list[Contribution]],
    limited: Mapping[SpendKey, LimitedCounter],
    *,
    emitted_at: datetime,
) -> list[BudgetAlert]:
    """The alerts the batch's contributions cross, counter by counter in lock order."""
    alerts: list[BudgetAlert] = []
    for spend_key in sorted(limited):
        counter = limited[spend_key]
        if not _may_cross(counter):
            continue
        key = CounterKey.from_spend_key(spend_key)
        for crossing in crossings_by_events(
            counter.before_usd,
            contributions[spend_key],
            limit_usd=counter.limit_usd,
            warn_threshold_pct=counter.warn_threshold_pct,
        ):
            alerts.append(
                alert_for(
                    key,
                    crossing,
                    limit_usd=counter.limit_usd,
                    warn_threshold_pct=counter.warn_threshold_pct,
                    emitted_at=emitted_at,
                )
            )
    return alerts


@functools.lru_cache(maxsize=4096)
def _warning_threshold(limit_usd: Decimal, warn_threshold_pct: int) -> Decimal:
    return threshold_usd(AlertLevel.WARNING, limit_usd, warn_threshold_pct)


def _may_cross(counter: LimitedCounter) -> bool:
    """Whether some level lies in (before, after]: most counters are below the warning after
    the batch too, or past the limit before it."""
    return (
        counter.after_usd >= _warning_threshold(counter.limit_usd, counter.warn_threshold_pct)
        and counter.before_usd < counter.limit_usd
    )
