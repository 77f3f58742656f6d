"""Reconcile: every stored number derived from events against one pass over the events
(design: corrections-reconcile.md §10). Callable from the CLI, the rollup schedule and the soak.

Per month and chunk of tenants, one read-only snapshot (storage/reconcile.py) judged in pure
Python (domain/reconcile.py). Drifts of the kinds that lag by design (another worker writes
them) are candidates: after `confirm_seconds` their chunks are read again, and only those found
again with the same difference are reported.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from llm_usage.core.clock import worker_clock
from llm_usage.core.settings import Settings
from llm_usage.domain.budgets import budget_horizon
from llm_usage.domain.period_charges import effective_period_charges
from llm_usage.domain.periods import next_month, parse_period
from llm_usage.domain.reconcile import (
    Drift,
    InvoiceKey,
    TopicAlerts,
    alerts_due,
    by_kind,
    compare_alerts,
    compare_budget_records,
    compare_counters,
    compare_effective,
    compare_holds,
    compare_invoices,
    compare_topic,
    compare_usage,
    compare_waits,
    confirmed,
    expected_invoices,
    needs_confirming,
)
from llm_usage.kafka.alert_topic import read_alerts
from llm_usage.rollup.lines import adjustment_lines, billed_so_far
from llm_usage.storage.invoice_lines import closed_periods
from llm_usage.storage.pool import connection_from, snapshot_from
from llm_usage.storage.reconcile import (
    ChunkRows,
    ClosedMonthRows,
    Month,
    read_chunk,
    stuck_waits,
    tenants_of_period,
)

# A correction waiting this long past CORRECTION_WAIT_SECONDS is stuck (design §10.3).
STUCK_MARGIN_SECONDS = 300.0

# Tenants per snapshot: short enough that no snapshot holds back the counters' pruning for long.
TENANTS_PER_CHUNK = 200

# Chunks a command reads at once, each a statement on a connection of its own: the comparison is
# CPU-bound in the database, and two keep two of its cores busy. The scheduled run reads one at
# a time and leaves the rollup's other connection to its jobs.
COMMAND_READERS = 2


@dataclass(frozen=True)
class ReconcileReport:
    periods: list[str]
    drifts: list[Drift]
    events: int
    seconds: float
    confirmed_after_seconds: float
    topic_read: bool = True
    by_kind: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_kind", by_kind(self.drifts))

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "drifts": len(self.drifts),
            "by_kind": self.by_kind,
            "periods": self.periods,
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.events_per_second),
            "confirmed_after_seconds": self.confirmed_after_seconds,
        }


@dataclass(frozen=True)
class _Chunk:
    month: Month
    tenants: Sequence[str]
    closed: bool
    horizon: date


async def reconcile(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    periods: Sequence[str],
    tenant_id: str | None = None,
    confirm_seconds: float,
    read_topic: bool = True,
    now: datetime | None = None,
    readers: int = 1,
) -> ReconcileReport:
    """Reconcile the months `periods` (YYYY-MM) of every tenant (or one); `now` (the workers'
    clock by default) sets the budget horizon: counters of earlier periods are pruned, and
    not compared. Up to `readers` chunks are read at once, each on a connection of `pool`."""
    started = time.perf_counter()
    horizon = budget_horizon(now or worker_clock()())
    async with connection_from(pool) as connection:
        closed = set(await closed_periods(connection))
        chunks: list[_Chunk] = []
        for period in periods:
            first_day = parse_period(period)
            month = Month(first_day, next_month(first_day), period)
            tenants = (
                [tenant_id] if tenant_id is not None else await tenants_of_period(connection, month)
            )
            chunks += [
                _Chunk(month, tenants[i : i + TENANTS_PER_CHUNK], period in closed, horizon)
                for i in range(0, len(tenants), TENANTS_PER_CHUNK)
            ]
        # Waiting corrections belong to no month: checked once, past the usage consumer's
        # deadline and a margin for its next round.
        stuck = await stuck_waits(
            connection,
            older_than_seconds=settings.correction_wait_seconds + STUCK_MARGIN_SECONDS,
            tenant_id=tenant_id,
        )
    topic = await read_alerts(settings) if read_topic else None
    drifts: list[Drift] = compare_waits(stuck)
    events = 0
    lagging: list[_Chunk] = []
    for chunk, rows in zip(chunks, await _read_all(pool, chunks, readers), strict=True):
        events += rows.events
        found = judge(rows, chunk.month, chunk.tenants, topic=topic)
        drifts += found
        if needs_confirming(found):
            lagging.append(chunk)
    waited = 0.0
    if lagging and confirm_seconds > 0:
        await asyncio.sleep(confirm_seconds)
        waited = confirm_seconds
        topic = await read_alerts(settings) if read_topic else None
        again: list[Drift] = []
        for chunk, rows in zip(lagging, await _read_all(pool, lagging, readers), strict=True):
            again += judge(rows, chunk.month, chunk.tenants, topic=topic)
        drifts = confirmed(drifts, again)
    return ReconcileReport(
        list(periods), drifts, events, time.perf_counter() - started, waited, read_topic
    )


async def _read_all(pool: asyncpg.Pool, chunks: Sequence[_Chunk], readers: int) -> list[ChunkRows]:
    """Every chunk's rows, in order, `readers` at a time (each chunk's are drifts and a few
    small maps: holding them all is cheap)."""
    turns = asyncio.Semaphore(readers)

    async def read(chunk: _Chunk) -> ChunkRows:
        async with turns:
            return await _read(pool, chunk)

    return list(await asyncio.gather(*(read(chunk) for chunk in chunks)))


async def _read(pool: asyncpg.Pool, chunk: _Chunk) -> ChunkRows:
    async with snapshot_from(pool) as connection:
        return await read_chunk(
            connection, chunk.month, chunk.tenants, closed=chunk.closed, horizon=chunk.horizon
        )


def judge(
    rows: ChunkRows,
    month: Month,
    tenants: Sequence[str],
    *,
    topic: TopicAlerts | None,
) -> list[Drift]:
    """Every drift of one chunk's snapshot (and of the topic's alerts of its tenants)."""
    drifts = compare_usage(
        (rows.totals.expected, rows.totals.found),
        (rows.dimensions.expected, rows.dimensions.found),
    )
    drifts += compare_counters(rows.counters.expected, rows.counters.found)
    if rows.closed is not None:
        drifts += compare_invoices(*_invoices(rows, month))
    on_topic = None
    if topic is not None:
        on_topic = topic.of(tenants, month.first_day, month.next_month)
    drifts += compare_alerts(
        alerts_due(rows.spend, rows.policies),
        rows.outbox,
        on_topic,
        retained_since=None if topic is None else topic.retained_since,
    )
    if topic is not None and on_topic is not None:
        drifts += compare_topic(
            {i: (topic.owners[i][0], n) for i, n in on_topic.items()},
            (alert.alert_id for alert in rows.outbox),
        )
    drifts += compare_holds(rows.open_holds, rows.held)
    corrected = rows.corrections
    drifts += compare_effective(corrected.originals, corrected.history, corrected.effective)
    drifts += compare_budget_records(corrected.budget)
    return drifts


def _invoices(rows: ChunkRows, month: Month) -> tuple[dict[InvoiceKey, int], dict[InvoiceKey, int]]:
    """(expected, billed) cents per (tenant, deployment) of a closed month: billed is what the
    lines of closed months bill for it plus the adjustment its late usage would get now in the
    first open month (computed from the stored aggregate, as the rollup does)."""
    closed: ClosedMonthRows = rows.closed or ClosedMonthRows()
    period = month.period
    charges = effective_period_charges(closed.period_charges)
    period_charges: dict[InvoiceKey, Decimal] = {
        (tenant, deployment, period): charge.period_charge_usd
        for (tenant, deployment), charge in charges.items()
    }
    expected = expected_invoices(rows.charges, period_charges)
    billed_lines = billed_so_far(closed.lines)
    billed: dict[InvoiceKey, int] = {key: b.cents for key, b in billed_lines.items()}
    marked = set(closed.marked)
    for line in adjustment_lines(
        period=period,
        original_period=period,
        totals={(t, d): usage for t, d, usage in closed.marked_usage},
        billed={key: b for key, b in billed_lines.items() if key[0] in marked},
        charges={key: charge for key, charge in charges.items() if key[0] in marked},
    ):
        key = (line.tenant_id, line.deployment_id, period)
        billed[key] = billed.get(key, 0) + line.amount_cents
    return expected, billed
