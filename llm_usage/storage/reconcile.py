"""Reconcile's reads (design: corrections-reconcile.md §10.2, §18): the period's tenants, then per
chunk of tenants one pass over their events compared in the server with the stored rows derived
from them (only what differs comes back), all in one `REPEATABLE READ READ ONLY` transaction
(plain MVCC reads: no worker ever waits for them).

Chunks are ranges of tenants in the database's order (`tenants_of_period`), so every statement
keeps an index range scan on its leading `tenant_id`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, Final

from llm_usage.domain.budgets import SCOPE_FIELDS, BudgetWindow, ScopeType, SpendKey
from llm_usage.domain.corrections import Correction, Effective
from llm_usage.domain.invoices import InvoiceLine
from llm_usage.domain.period_charges import PeriodCharge
from llm_usage.domain.reconcile import (
    DIMENSION_FIGURES,
    EFFECTIVE_FIELDS,
    TOTAL_FIGURES,
    BudgetRecord,
    EventKey,
    InvoiceKey,
    OpenHold,
    OutboxAlert,
    Policy,
    StuckWait,
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

# Every tenant with anything in the period. The two large tables, the events and the budget
# counters, are read by a skip scan (one index probe per tenant, not a scan of the month); the
# others are small.
_SCANNED: Final = (
    ("llm_usage_events", "occurred_at >= $1 AND occurred_at < $2"),
    ("budget_spend", "period_start >= $3 AND period_start < $4"),
)
_SMALL: Final = """
    UNION SELECT tenant_id FROM usage_daily_totals WHERE day >= $3 AND day < $4
    UNION SELECT tenant_id FROM invoice_lines WHERE original_period = $5
    UNION SELECT tenant_id FROM period_charges WHERE period = $5
    UNION SELECT tenant_id FROM budget_alert_outbox WHERE period_start >= $3 AND period_start < $4
    ORDER BY tenant_id
"""


def _skip_scan(name: str, table: str, where: str) -> str:
    return f"""{name} AS (
        (SELECT tenant_id FROM {table} WHERE {where} ORDER BY tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT t.tenant_id FROM {table} AS t
                WHERE t.tenant_id > {name}.tenant_id AND {where} ORDER BY t.tenant_id LIMIT 1)
        FROM {name} WHERE {name}.tenant_id IS NOT NULL
    )"""


_TENANTS: Final = (
    "WITH RECURSIVE "
    + ", ".join(_skip_scan(f"skip{i}", table, where) for i, (table, where) in enumerate(_SCANNED))
    + "\n    "
    + "\n    UNION ".join(
        f"SELECT tenant_id FROM skip{i} WHERE tenant_id IS NOT NULL" for i in range(len(_SCANNED))
    )
    + _SMALL
)
# Citus plans a recursive CTE only with a filter on the distribution column: on a coordinator
# the large tables are listed by their tenants instead (each worker scans its shards).
_TENANTS_CITUS: Final = (
    "\n    UNION ".join(
        f"SELECT DISTINCT tenant_id FROM {table} WHERE {where}" for table, where in _SCANNED
    )
    + _SMALL
)

# The events the period's numbers are made of: each with its corrections applied (0016's view),
# voided ones left out.
_EVENTS: Final = "llm_usage_events_effective"
_SET_COLUMNS: Final = ", ".join(d.column for d in Dimension)
# Only what the sums need: a narrow row is cheaper to sort and to pass between processes.
# The keys compare by byte (COLLATE "C"): the sorts of the grouping sets then take the fast
# path of memcmp and abbreviated keys, whatever the database's collation.
_EVENT_COLUMNS: Final = (
    ", ".join(f'{c} COLLATE "C" AS {c}' for c in ("tenant_id", *(d.column for d in Dimension)))
    + ", input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, total_tokens, "
    "customer_charge_usd, charge_estimated"
)
# grouping() sets a bit, first argument highest, for each column the row is not grouped by.
_ALL_GROUPED: Final = (1 << len(Dimension)) - 1
_SET_OF_GROUPING: Final = {
    _ALL_GROUPED - (1 << (len(Dimension) - 1 - i)): d for i, d in enumerate(Dimension)
}
# The dimensions whose keys are budget scopes (storage names both alike), and the tenant's.
_SCOPES: Final = {
    d.value: scope.value for scope, column in SCOPE_FIELDS for d in Dimension if d.column == column
}
_TOTAL_COLUMNS: Final = ", ".join(TOTAL_FIGURES)
_DIMENSION_COLUMNS: Final = ", ".join(DIMENSION_FIGURES)


def _case(on: str, values: Mapping[Any, str]) -> str:
    return f"CASE {on} " + " ".join(f"WHEN {g} THEN {v}" for g, v in values.items()) + " END"


def _figures(alias: str, names: Sequence[str]) -> str:
    """The figures of a row as numeric[], NULL when the row is missing on that side."""
    array = ", ".join(f"{alias}.{name}::numeric" for name in names)
    return f"CASE WHEN {alias}.tenant_id IS NULL THEN NULL ELSE ARRAY[{array}] END"


def _differ(names: Sequence[str]) -> str:
    """Whether a row's figures differ, a missing row counting as zeros on its side (so a stored
    row of zeros equals a missing expected one)."""
    return (
        f"ROW({', '.join(f'coalesce(x.{n}, 0)' for n in names)}) IS DISTINCT FROM "
        f"ROW({', '.join(f'coalesce(s.{n}, 0)' for n in names)})"
    )


def _same_key(column: str) -> str:
    """Equal keys, nulls equal too, in a form a hash join takes (a FULL JOIN needs one)."""
    return (
        f"(x.{column} IS NULL) = (s.{column} IS NULL) "
        f"AND coalesce(x.{column}, '') = coalesce(s.{column}, '')"
    )


# The dimension rows that are a budget scope's daily charge, and the scope's type; the
# deployment rows, whose sum is the tenant's. Days before the budget horizon ($7) count toward
# no counter.
_SCOPE_TYPE: Final = _case("dimension", {f"'{d}'": f"'{t}'" for d, t in _SCOPES.items()})
_SCOPE_DIMENSIONS: Final = ", ".join(f"'{d}'" for d in _SCOPES)
_SCOPE_ROWS: Final = f"dimension IN ({_SCOPE_DIMENSIONS}) AND key IS NOT NULL AND day >= $7"
_TENANT_ROWS: Final = "dimension = 'deployment' AND day >= $7"

# Which dimension a grouping set's row is, and its key: the sets' rows are the dimension rows.
_GROUPING: Final = f"grouping({_SET_COLUMNS})"
_DIMENSION_OF_SET: Final = _case(
    _GROUPING, {g: f"'{d.value}'" for g, d in _SET_OF_GROUPING.items()}
)
_KEY_OF_SET: Final = _case(_GROUPING, {g: d.column for g, d in _SET_OF_GROUPING.items()})

# Q1, the one pass, and its comparison with everything stored from it, in one statement that
# returns only what differs (design §18): the month's events of the chunk are read once (every
# dimension's daily sums, by grouping sets), the stored aggregates and counters once each,
# and joined in the server. $1..$2 the chunk's tenants, $3..$4 the month's instants, $5..$6 its
# days, $7 the budget horizon (earlier days count toward no counter; earlier counters are pruned).
_COMPARE = f"""
    WITH dims AS MATERIALIZED (
        SELECT tenant_id, {_DIMENSION_OF_SET} AS dimension, day, {_KEY_OF_SET} AS key,
               count(*) AS requests, sum(input_tokens)::bigint AS input_tokens,
               sum(output_tokens)::bigint AS output_tokens,
               sum(cached_input_tokens)::bigint AS cached_input_tokens,
               sum(reasoning_tokens)::bigint AS reasoning_tokens,
               sum(total_tokens)::bigint AS total_tokens, sum(customer_charge_usd) AS charge_usd,
               coalesce(sum(customer_charge_usd) FILTER (WHERE charge_estimated), 0)
                   AS estimated_charge_usd
        FROM (SELECT {_EVENT_COLUMNS}, (occurred_at AT TIME ZONE 'UTC')::date AS day
              FROM {_EVENTS}
              WHERE TENANTS AND occurred_at >= $3 AND occurred_at < $4 AND NOT voided) AS e
        GROUP BY GROUPING SETS ({", ".join(f"(tenant_id, day, {d.column})" for d in Dimension)})
    ),
    stored_dims AS (
        SELECT tenant_id, dimension, day, key, {_DIMENSION_COLUMNS} FROM usage_daily_dimensions
        WHERE TENANTS AND day >= $5 AND day < $6
    ),
    d_dims AS (
        SELECT 'dimension' AS kind, coalesce(x.tenant_id, s.tenant_id) AS tenant_id,
               coalesce(x.dimension, s.dimension) AS a, coalesce(x.key, s.key) AS key,
               NULL::text AS b, coalesce(x.day, s.day) AS day,
               {_figures("x", DIMENSION_FIGURES)} AS expected,
               {_figures("s", DIMENSION_FIGURES)} AS found
        FROM dims AS x FULL JOIN stored_dims AS s
            ON x.tenant_id = s.tenant_id AND x.dimension = s.dimension AND x.day = s.day
               AND {_same_key("key")}
        WHERE {_differ(DIMENSION_FIGURES)}
    ),
    totals AS (
        SELECT tenant_id, key AS deployment_id, day, {_TOTAL_COLUMNS} FROM dims
        WHERE dimension = 'deployment'
    ),
    stored_totals AS (
        SELECT tenant_id, deployment_id, day, {_TOTAL_COLUMNS} FROM usage_daily_totals
        WHERE TENANTS AND day >= $5 AND day < $6
    ),
    d_totals AS (
        SELECT 'total', coalesce(x.tenant_id, s.tenant_id), NULL::text,
               coalesce(x.deployment_id, s.deployment_id), NULL::text, coalesce(x.day, s.day),
               {_figures("x", TOTAL_FIGURES)}, {_figures("s", TOTAL_FIGURES)}
        FROM totals AS x FULL JOIN stored_totals AS s
            ON x.tenant_id = s.tenant_id AND x.day = s.day AND {_same_key("deployment_id")}
        WHERE {_differ(TOTAL_FIGURES)}
    ),
    spend AS (  -- each counter's expected spend: its scope's day, or its month, of charges
        SELECT tenant_id, {_SCOPE_TYPE} AS scope_type, key AS scope_id,
               '{BudgetWindow.DAILY.value}' AS "window", day AS period_start,
               charge_usd AS spend_usd
        FROM dims WHERE {_SCOPE_ROWS}
        UNION ALL
        SELECT tenant_id, '{ScopeType.TENANT.value}', tenant_id, '{BudgetWindow.DAILY.value}',
               day, sum(charge_usd)
        FROM dims WHERE {_TENANT_ROWS} GROUP BY tenant_id, day
        UNION ALL  -- one month: its monthly counters all start on its first day
        SELECT tenant_id, {_SCOPE_TYPE}, key, '{BudgetWindow.MONTHLY.value}', $5::date,
               sum(charge_usd)
        FROM dims WHERE {_SCOPE_ROWS} GROUP BY tenant_id, dimension, key
        UNION ALL
        SELECT tenant_id, '{ScopeType.TENANT.value}', tenant_id, '{BudgetWindow.MONTHLY.value}',
               $5::date, sum(charge_usd)
        FROM dims WHERE {_TENANT_ROWS} GROUP BY tenant_id
    ),
    stored_spend AS (
        SELECT tenant_id, scope_type, scope_id, "window", period_start, spend_usd
        FROM budget_spend
        WHERE TENANTS AND period_start >= $5 AND period_start < $6 AND period_start >= $7
    ),
    d_spend AS (
        SELECT 'counter', coalesce(x.tenant_id, s.tenant_id), coalesce(x.scope_type, s.scope_type),
               coalesce(x.scope_id, s.scope_id), coalesce(x."window", s."window"),
               coalesce(x.period_start, s.period_start),
               ARRAY[coalesce(x.spend_usd, 0)], ARRAY[coalesce(s.spend_usd, 0)]
        FROM spend AS x FULL JOIN stored_spend AS s
            ON x.tenant_id = s.tenant_id AND x.scope_type = s.scope_type
               AND x.scope_id = s.scope_id AND x."window" = s."window"
               AND x.period_start = s.period_start
        WHERE coalesce(x.spend_usd, 0) <> coalesce(s.spend_usd, 0)
    )
    SELECT * FROM d_dims
    UNION ALL SELECT * FROM d_totals
    UNION ALL SELECT * FROM d_spend
    -- What the alerts are judged with: the expected spend of every counter with a policy.
    UNION ALL
    SELECT 'spend', x.tenant_id, x.scope_type, x.scope_id, x."window", x.period_start,
           ARRAY[x.spend_usd], NULL
    FROM spend AS x
    WHERE EXISTS (SELECT FROM budget_policies AS p
                  WHERE p.tenant_id = x.tenant_id AND TENANTS_P
                    AND p.scope_type = x.scope_type AND p.scope_id = x.scope_id)
    -- What a closed month's invoices are judged with: the exact charge per deployment.
    UNION ALL
    SELECT 'charge', tenant_id, NULL, key, NULL, min(day), ARRAY[sum(charge_usd)], NULL
    FROM dims WHERE dimension = 'deployment' GROUP BY tenant_id, key
    UNION ALL
    SELECT 'events', NULL, NULL, NULL, NULL, NULL, ARRAY[coalesce(sum(requests), 0)], NULL
    FROM dims WHERE dimension = 'deployment'
"""
_COMPARE_CHUNK: Final = _COMPARE.replace(
    "TENANTS_P", "p.tenant_id >= $1 AND p.tenant_id <= $2"
).replace("TENANTS", "tenant_id >= $1 AND tenant_id <= $2")
# Citus runs grouping sets only in a query routed to one shard: one tenant at a time there,
# every table filtered by it.
_COMPARE_TENANT: Final = _COMPARE.replace("TENANTS_P", "p.tenant_id = $1 AND $1 = $2").replace(
    "TENANTS", "tenant_id = $1 AND $1 = $2"
)
# The sorted sets and hashed joins of one chunk: spilling them to disk is slower, not wrong.
# Hashing both sides of the full joins beats sorting them (merge joins took a fifth of a chunk's
# time). Each chunk is planned for its own tenants and month: from a connection's sixth chunk on,
# PostgreSQL would otherwise reuse a generic plan of the prepared statement, a fifth slower.
_SESSION: Final = (
    "SET LOCAL work_mem = '256MB'; SET LOCAL enable_mergejoin = off; "
    "SET LOCAL plan_cache_mode = force_custom_plan"
)

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
class Differing:
    """Rows that differ between what the events make and what is stored, by key: a side
    without the row has no entry."""

    expected: dict[Any, Any] = field(default_factory=dict)
    found: dict[Any, Any] = field(default_factory=dict)


@dataclass
class ChunkRows:
    """Everything one chunk's snapshot holds (the aggregates and counters: only what differs)."""

    totals: Differing  # TotalsKey -> TOTAL_FIGURES
    dimensions: Differing  # DimensionKey -> DIMENSION_FIGURES
    counters: Differing  # SpendKey -> spend, from the budget horizon on
    spend: dict[SpendKey, Decimal]  # the expected spend of every counter with a policy
    charges: dict[InvoiceKey, Decimal]  # the exact charge per (tenant, deployment, month)
    events: int  # read by the one pass
    outbox: list[OutboxAlert]
    policies: list[Policy]
    held: dict[SpendKey, Decimal]
    open_holds: list[OpenHold]
    closed: ClosedMonthRows | None  # None: the month is open
    corrections: CorrectionRows = field(default_factory=lambda: CorrectionRows({}, {}, {}))


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
    period = (_midnight(month.first_day), _midnight(month.next_month))
    await connection.execute(_SESSION)
    compare = (month.first_day, month.next_month, horizon)
    if await citus_installed(connection):
        rows = [
            row
            for tenant in tenants
            for row in await connection.fetch(_COMPARE_TENANT, tenant, tenant, *period, *compare)
        ]
    else:
        rows = await connection.fetch(_COMPARE_CHUNK, lo, hi, *period, *compare)
    totals, dimensions, counters = Differing(), Differing(), Differing()
    spend: dict[SpendKey, Decimal] = {}
    charges: dict[InvoiceKey, Decimal] = {}
    events = 0
    for kind, tenant, a, key, b, day, expected, found in rows:
        if kind == "dimension":
            _differing(dimensions, (tenant, a, day, key), DIMENSION_FIGURES, expected, found)
        elif kind == "total":
            _differing(totals, (tenant, key, day), TOTAL_FIGURES, expected, found)
        elif kind == "counter":
            counters.expected[(tenant, a, key, b, day)] = expected[0]
            counters.found[(tenant, a, key, b, day)] = found[0]
        elif kind == "spend":
            spend[(tenant, a, key, b, day)] = expected[0]
        elif kind == "charge":
            charges[(tenant, key, month.period)] = expected[0]
        else:
            events += int(expected[0])
    outbox = [OutboxAlert(*r.values()) for r in await connection.fetch(_OUTBOX, *days)]
    policies = [Policy(*r.values()) for r in await connection.fetch(_POLICIES, lo, hi)]
    held = {(r[0], r[1], r[2], r[3], r[4]): r[5] for r in await connection.fetch(_HELD, *days)}
    holds = [OpenHold(*r.values()) for r in await connection.fetch(_OPEN_HOLDS, *days)]
    closed_rows = await _closed_month(connection, month, tenants) if closed else None
    corrections = await _corrections(connection, lo, hi, period, horizon)
    return ChunkRows(
        totals,
        dimensions,
        counters,
        spend,
        charges,
        events,
        outbox,
        policies,
        held,
        holds,
        closed_rows,
        corrections,
    )


_MONEY: Final = frozenset({"charge_usd", "estimated_charge_usd"})


def _differing(
    into: Differing,
    key: tuple[Any, ...],
    names: Sequence[str],
    expected: list[Decimal] | None,
    found: list[Decimal] | None,
) -> None:
    """A differing row's figures, counts back to int from the statement's numeric[]."""
    for side, figures in ((into.expected, expected), (into.found, found)):
        if figures is not None:
            side[key] = [
                value if name in _MONEY else int(value)
                for name, value in zip(names, figures, strict=True)
            ]


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
