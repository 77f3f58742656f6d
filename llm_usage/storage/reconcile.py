"""Reconcile's reads (design: corrections-reconcile.md §10.2): the period's tenants, then per
chunk of tenants one pass over their events and the stored rows derived from them, all in one
`REPEATABLE READ READ ONLY` transaction (plain MVCC reads: no worker ever waits for them).

Chunks are ranges of tenants in the database's order (`tenants_of_period`), so every statement
keeps an index range scan on its leading `tenant_id`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, Final

from llm_usage.domain.budgets import SpendKey
from llm_usage.domain.corrections import Correction, Effective
from llm_usage.domain.invoices import InvoiceLine
from llm_usage.domain.period_charges import PeriodCharge
from llm_usage.domain.reconcile import (
    EFFECTIVE_FIELDS,
    BudgetRecord,
    DimensionKey,
    EventKey,
    OpenHold,
    OutboxAlert,
    Policy,
    StuckWait,
    TotalsKey,
)
from llm_usage.domain.usage import Usage
from llm_usage.storage.corrections import correction_of
from llm_usage.storage.flavour import citus_installed
from llm_usage.storage.invoice_lines import (
    GroupUsage,
    closed_lines_billing,
    usage_of_tenants,
)
from llm_usage.storage.period_charges import period_charges_of_month
from llm_usage.storage.pool import Connection
from llm_usage.storage.usage_dimensions import Dimension

# An outbox row unpublished for longer than this is one the relay should have sent.
UNPUBLISHED_AFTER_SECONDS: Final = 300

# Every tenant with anything in the period: a skip scan of its events (one index probe per
# tenant and partition, not a scan of the month) and the tables derived from them.
_TENANTS = """
    WITH RECURSIVE skip AS (
        (SELECT tenant_id FROM llm_usage_events
         WHERE occurred_at >= $1 AND occurred_at < $2 ORDER BY tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT e.tenant_id FROM llm_usage_events AS e
                WHERE e.tenant_id > skip.tenant_id AND e.occurred_at >= $1 AND e.occurred_at < $2
                ORDER BY e.tenant_id LIMIT 1)
        FROM skip WHERE skip.tenant_id IS NOT NULL
    )
    SELECT tenant_id FROM skip WHERE tenant_id IS NOT NULL
    UNION SELECT tenant_id FROM usage_daily_totals WHERE day >= $3 AND day < $4
    UNION SELECT tenant_id FROM budget_spend WHERE period_start >= $3 AND period_start < $4
    UNION SELECT tenant_id FROM invoice_lines WHERE original_period = $5
    UNION SELECT tenant_id FROM period_charges WHERE period = $5
    UNION SELECT tenant_id FROM budget_alert_outbox WHERE period_start >= $3 AND period_start < $4
    ORDER BY tenant_id
"""
# Citus plans a recursive CTE only with a filter on the distribution column: on a coordinator
# the month's events are listed by their tenants instead (each worker scans its shards).
_TENANTS_CITUS: Final = (
    _TENANTS[: _TENANTS.index("WITH RECURSIVE")]
    + (
        "SELECT DISTINCT tenant_id FROM llm_usage_events "
        "WHERE occurred_at >= $1 AND occurred_at < $2"
    )
    + _TENANTS[_TENANTS.index("\n    UNION SELECT tenant_id FROM usage_daily_totals") :]
)

# The events the period's numbers are made of: each with its corrections applied (0016's view),
# voided ones left out.
_EVENTS: Final = "llm_usage_events_effective"
_SET_COLUMNS: Final = ", ".join(d.column for d in Dimension)

# Q1, the one pass: every dimension's daily sums in one scan (hashed grouping sets).
_SETS = f"""
    SELECT grouping({_SET_COLUMNS}) AS g, tenant_id, day, {_SET_COLUMNS},
           count(*) AS requests, sum(input_tokens)::bigint, sum(output_tokens)::bigint,
           sum(cached_input_tokens)::bigint, sum(reasoning_tokens)::bigint,
           sum(total_tokens)::bigint, sum(customer_charge_usd),
           coalesce(sum(customer_charge_usd) FILTER (WHERE charge_estimated), 0)
    FROM (SELECT *, (occurred_at AT TIME ZONE 'UTC')::date AS day
          FROM {_EVENTS}
          WHERE tenant_id >= $1 AND tenant_id <= $2
            AND occurred_at >= $3 AND occurred_at < $4 AND NOT voided) AS e
    GROUP BY GROUPING SETS ({", ".join(f"(tenant_id, day, {d.column})" for d in Dimension)})
"""
# Citus runs grouping sets only in a query routed to one shard: one tenant at a time there.
_SETS_OF_TENANT: Final = _SETS.replace(
    "WHERE tenant_id >= $1 AND tenant_id <= $2", "WHERE tenant_id = $1 AND $1 = $2"
)
# grouping() sets a bit, first argument highest, for each column the row is not grouped by.
_ALL_GROUPED: Final = (1 << len(Dimension)) - 1
_SET_OF_GROUPING: Final = {
    _ALL_GROUPED - (1 << (len(Dimension) - 1 - i)): d for i, d in enumerate(Dimension)
}

_TOTALS = """
    SELECT tenant_id, deployment_id, day, charge_usd, input_tokens, output_tokens, requests,
           estimated_charge_usd
    FROM usage_daily_totals
    WHERE tenant_id >= $1 AND tenant_id <= $2 AND day >= $3 AND day < $4
"""
_DIMENSIONS = """
    SELECT tenant_id, dimension, day, key, requests, input_tokens, output_tokens,
           cached_input_tokens, reasoning_tokens, total_tokens, charge_usd, estimated_charge_usd
    FROM usage_daily_dimensions
    WHERE tenant_id >= $1 AND tenant_id <= $2 AND day >= $3 AND day < $4
"""
_COUNTERS = """
    SELECT tenant_id, scope_type, scope_id, "window", period_start, spend_usd
    FROM budget_spend
    WHERE tenant_id >= $1 AND tenant_id <= $2 AND period_start >= $3 AND period_start < $4
"""
_OUTBOX = f"""
    SELECT alert_id, tenant_id, published_at IS NOT NULL AS published,
           published_at IS NULL
               AND created_at < now() - interval '{UNPUBLISHED_AFTER_SECONDS} seconds' AS overdue,
           published_at
    FROM budget_alert_outbox
    WHERE tenant_id >= $1 AND tenant_id <= $2 AND period_start >= $3 AND period_start < $4
"""
_POLICIES = """
    SELECT tenant_id, scope_type, scope_id, daily_limit_usd, monthly_limit_usd,
           warn_threshold_pct, updated_at
    FROM budget_policies WHERE tenant_id >= $1 AND tenant_id <= $2
"""
_HELD = """
    SELECT tenant_id, scope_type, scope_id, "window", period_start, placed_usd - ended_usd
    FROM budget_held
    WHERE tenant_id >= $1 AND tenant_id <= $2 AND period_start >= $3 AND period_start < $4
"""
_OPEN_HOLDS = """
    SELECT tenant_id, deployment_id, user_id, agent_id, day, amount_usd
    FROM budget_holds
    WHERE tenant_id >= $1 AND tenant_id <= $2 AND day >= $3 AND day < $4 AND state = 'open'
"""


# The chunk's applied corrections of events of the month, their effective rows, and the events.
_HISTORY = """
    SELECT tenant_id, correction_id, gateway_request_id, action, fields::text AS fields, reason,
           actor, occurred_at, event_occurred_at
    FROM usage_corrections
    WHERE tenant_id >= $1 AND tenant_id <= $2 AND verdict = 'applied'
      AND event_occurred_at >= $3 AND event_occurred_at < $4
"""
_EFFECTIVE_ROWS = f"""
    SELECT tenant_id, occurred_at, gateway_request_id, {", ".join(EFFECTIVE_FIELDS)}
    FROM usage_event_effective
    WHERE tenant_id >= $1 AND tenant_id <= $2 AND occurred_at >= $3 AND occurred_at < $4
"""
_CORRECTED_EVENTS = f"""
    SELECT tenant_id, occurred_at, gateway_request_id,
           {", ".join(c for c in EFFECTIVE_FIELDS if c != "voided")}
    FROM llm_usage_events
    WHERE tenant_id >= $1 AND tenant_id <= $2 AND occurred_at >= $3 AND occurred_at < $4
      AND (tenant_id, occurred_at, gateway_request_id) IN (
          SELECT tenant_id, event_occurred_at, gateway_request_id FROM usage_corrections
          WHERE tenant_id >= $1 AND tenant_id <= $2 AND verdict = 'applied'
            AND event_occurred_at >= $3 AND event_occurred_at < $4
          UNION
          SELECT tenant_id, occurred_at, gateway_request_id FROM usage_event_effective
          WHERE tenant_id >= $1 AND tenant_id <= $2 AND occurred_at >= $3 AND occurred_at < $4)
"""
# Each judged correction of the month's events from the budget horizon on ($5: earlier days
# count toward no counter, and their records are pruned), and whether the budget consumer
# recorded it.
_BUDGET_RECORDS = """
    SELECT c.tenant_id, c.correction_id, c.verdict = 'applied',
           EXISTS (SELECT FROM budget_corrections AS b
                   WHERE b.tenant_id = c.tenant_id AND b.correction_id = c.correction_id)
    FROM usage_corrections AS c
    WHERE c.tenant_id >= $1 AND c.tenant_id <= $2
      AND c.event_occurred_at >= $3 AND c.event_occurred_at < $4
      AND c.event_occurred_at >= $5
"""
_STUCK_WAITS = """
    SELECT consumer, tenant_id, correction_id FROM correction_waits
    WHERE first_seen_at < now() - make_interval(secs => $1)
      AND ($2::text IS NULL OR tenant_id = $2)
"""


@dataclass(frozen=True)
class Month:
    """The period reconciled: its first day, the next month's, and its name."""

    first_day: date
    next_month: date
    period: str


@dataclass
class ClosedMonthRows:
    """What a closed month's invoices are checked with, for a chunk's tenants."""

    lines: list[InvoiceLine] = field(default_factory=list)  # of closed months billing it
    period_charges: list[PeriodCharge] = field(default_factory=list)
    marked: list[str] = field(default_factory=list)  # tenants with late usage not billed yet
    marked_usage: list[GroupUsage] = field(default_factory=list)  # theirs, from the aggregate


@dataclass(frozen=True)
class CorrectionRows:
    """The month's corrected events of a chunk: each as stored, its applied corrections, and
    its `usage_event_effective` row."""

    originals: dict[EventKey, Effective]
    history: dict[EventKey, list[Correction]]
    effective: dict[EventKey, Effective]
    budget: list[BudgetRecord] = field(default_factory=list)


@dataclass
class ChunkRows:
    """Everything one chunk's snapshot holds."""

    sets: dict[DimensionKey, list[Any]]
    totals: dict[TotalsKey, list[Any]]
    dimensions: dict[DimensionKey, list[Any]]
    counters: dict[SpendKey, Decimal]
    outbox: list[OutboxAlert]
    policies: list[Policy]
    held: dict[SpendKey, Decimal]
    open_holds: list[OpenHold]
    closed: ClosedMonthRows | None  # None: the month is open
    corrections: CorrectionRows = field(default_factory=lambda: CorrectionRows({}, {}, {}))

    @property
    def events(self) -> int:
        """Events read by the one pass (the deployment set counts each once)."""
        return sum(
            figures[0] for (_, dimension, _, _), figures in self.sets.items()
            if dimension == Dimension.DEPLOYMENT.value
        )  # fmt: skip


async def tenants_of_period(connection: Connection, month: Month) -> list[str]:
    """Every tenant with events, aggregates, counters, lines or alerts in the month, in the
    database's order of tenant_id."""
    rows = await connection.fetch(
        _TENANTS_CITUS if await citus_installed(connection) else _TENANTS,
        _midnight(month.first_day),
        _midnight(month.next_month),
        month.first_day,
        month.next_month,
        month.period,
    )
    return [row[0] for row in rows]


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), UTC)


async def read_chunk(
    connection: Connection,
    month: Month,
    tenants: Sequence[str],
    *,
    closed: bool,
    horizon: date = date.min,
) -> ChunkRows:
    """The rows of the chunk from `tenants[0]` to `tenants[-1]` (both included, in the order
    `tenants_of_period` gives): run inside one snapshot (storage/pool.snapshot_from). Budget
    records are read for events from the budget `horizon` on."""
    lo, hi = tenants[0], tenants[-1]
    days = (lo, hi, month.first_day, month.next_month)
    sets: dict[DimensionKey, list[Any]] = {}
    period = (_midnight(month.first_day), _midnight(month.next_month))
    if await citus_installed(connection):
        set_rows = [
            row
            for tenant in tenants
            for row in await connection.fetch(_SETS_OF_TENANT, tenant, tenant, *period)
        ]
    else:
        set_rows = await connection.fetch(_SETS, lo, hi, *period)
    for row in set_rows:
        dimension = _SET_OF_GROUPING[row["g"]]
        key = (row["tenant_id"], dimension.value, row["day"], row[dimension.column])
        sets[key] = list(row.values())[3 + len(Dimension) :]
    totals = {
        (r[0], r[1], r[2]): [r[3], r[4], r[5], r[6], r[7]]
        for r in await connection.fetch(_TOTALS, *days)
    }
    dimensions = {
        (r[0], r[1], r[2], r[3]): list(r.values())[4:]
        for r in await connection.fetch(_DIMENSIONS, *days)
    }
    counters = {
        (r[0], r[1], r[2], r[3], r[4]): r[5] for r in await connection.fetch(_COUNTERS, *days)
    }
    outbox = [OutboxAlert(*r.values()) for r in await connection.fetch(_OUTBOX, *days)]
    policies = [Policy(*r.values()) for r in await connection.fetch(_POLICIES, lo, hi)]
    held = {(r[0], r[1], r[2], r[3], r[4]): r[5] for r in await connection.fetch(_HELD, *days)}
    holds = [OpenHold(*r.values()) for r in await connection.fetch(_OPEN_HOLDS, *days)]
    closed_rows = await _closed_month(connection, month, tenants) if closed else None
    corrections = await _corrections(connection, lo, hi, period, horizon)
    return ChunkRows(
        sets, totals, dimensions, counters, outbox, policies, held, holds, closed_rows, corrections
    )


async def _corrections(
    connection: Connection, lo: str, hi: str, period: tuple[datetime, datetime], horizon: date
) -> CorrectionRows:
    history: dict[EventKey, list[Correction]] = {}
    for row in await connection.fetch(_HISTORY, lo, hi, *period):
        key = (row["tenant_id"], row["event_occurred_at"], row["gateway_request_id"])
        history.setdefault(key, []).append(correction_of(row))
    effective = {
        (r[0], r[1], r[2]): Effective(*list(r.values())[3:])
        for r in await connection.fetch(_EFFECTIVE_ROWS, lo, hi, *period)
    }
    originals = {
        (r[0], r[1], r[2]): Effective(*list(r.values())[3:])
        for r in await connection.fetch(_CORRECTED_EVENTS, lo, hi, *period)
    }
    budget = [
        BudgetRecord(*r.values())
        for r in await connection.fetch(
            _BUDGET_RECORDS, lo, hi, *period, _midnight(max(horizon, date(1, 1, 2)))
        )
    ]
    return CorrectionRows(originals, history, effective, budget)


async def stuck_waits(
    connection: Connection, *, older_than_seconds: float, tenant_id: str | None
) -> list[StuckWait]:
    """Corrections (of any month) still waiting after `older_than_seconds`."""
    return [
        StuckWait(*row.values())
        for row in await connection.fetch(_STUCK_WAITS, older_than_seconds, tenant_id)
    ]


async def _closed_month(
    connection: Connection, month: Month, tenants: Sequence[str]
) -> ClosedMonthRows:
    marked = [
        row[0]
        for row in await connection.fetch(
            "SELECT tenant_id FROM usage_late_marks WHERE period = $1 "
            "AND tenant_id = ANY($2::text[]) ORDER BY tenant_id",
            month.period,
            list(tenants),
        )
    ]
    return ClosedMonthRows(
        lines=await closed_lines_billing(connection, original_period=month.period, tenants=tenants),
        period_charges=await period_charges_of_month(
            connection, period=month.period, tenants=tenants
        ),
        marked=marked,
        marked_usage=(
            await usage_of_tenants(
                connection, first_day=month.first_day, next_month=month.next_month, tenants=marked
            )
            if marked
            else []
        ),
    )


def usage_by_group(groups: list[GroupUsage]) -> dict[tuple[str, str | None], Usage]:
    return {(tenant, deployment): usage for tenant, deployment, usage in groups}
