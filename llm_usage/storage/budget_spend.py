"""The budget consumer's writes: which events it counts (the shared id window) and the spend
counters.

Every write takes rows in sorted order, so two replicas touching the same ids or counters lock
them in the same order and cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import NamedTuple

from llm_usage.domain.budgets import SCOPE_FIELDS, BudgetWindow, SpendKey
from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.domain.periods import utc_day
from llm_usage.storage.pool import Connection

# A batch's events reach PostgreSQL by one binary COPY into a session-local staging table (it
# empties at every commit), one row an event; PostgreSQL then expands each event into its
# counters and sums them. Every ORDER BY sorts text by code point (COLLATE "C"), as Python
# sorts: the lock order is the same whichever replica, and whichever release, takes the locks.
_STAGE_EVENTS = """
    CREATE TEMP TABLE IF NOT EXISTS budget_event_batch (
        gateway_request_id text, tenant_id text, deployment_id text, user_id text,
        agent_id text, day date, charge_usd numeric, input_tokens bigint, output_tokens bigint,
        cached_input_tokens bigint, reasoning_tokens bigint, total_tokens bigint,
        occurred_at timestamptz
    ) ON COMMIT DELETE ROWS
"""
STAGED_EVENT_COLUMNS = (
    "gateway_request_id",
    "tenant_id",
    "deployment_id",
    "user_id",
    "agent_id",
    "day",
    "charge_usd",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "total_tokens",
    "occurred_at",
)

# Counts the staged events that are the first copy of their id, by the same two-tier identity
# as the usage consumer (domain/identity.py), so both always agree on which copy is billed and
# counted: an id the window does not hold is added to it as counted — unless its month is past
# retention (`expired`), its Tier 1 key is stored already (an event older than the window) or
# it was counted before the window existed; an id the window holds is marked counted when the
# event is equal to the window's row and not counted yet. The rest (duplicates, conflicts,
# replays) leave the staging table and come back.
# Tests of a staged copy that name the tables Citus will not join correlated (below).
_CORRELATED_TESTS = """\
          AND NOT EXISTS (SELECT FROM budget_counted_legacy AS l
                          WHERE l.gateway_request_id = b.gateway_request_id)
          AND (EXISTS (SELECT FROM usage_event_ids AS k
                       WHERE k.gateway_request_id = b.gateway_request_id)
               OR NOT EXISTS (SELECT FROM llm_usage_events AS e
                              WHERE e.tenant_id = b.tenant_id
                                AND e.occurred_at = b.occurred_at
                                AND e.gateway_request_id = b.gateway_request_id))"""
_COUNT_STAGED = f"""
    WITH floor AS (
        SELECT coalesce(min(month), '-infinity')::timestamp AT TIME ZONE 'UTC' AS starts
        FROM usage_event_months WHERE state = 'attached'
    ), counted_now AS (
        INSERT INTO usage_event_ids AS w (gateway_request_id, tenant_id, deployment_id,
            input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, total_tokens,
            customer_charge_usd, occurred_at, user_id, agent_id, attributed, counted)
        SELECT b.gateway_request_id, b.tenant_id, b.deployment_id, b.input_tokens,
            b.output_tokens, b.cached_input_tokens, b.reasoning_tokens, b.total_tokens,
            b.charge_usd, b.occurred_at, b.user_id, b.agent_id, true, true
        FROM budget_event_batch AS b
        WHERE b.occurred_at >= (SELECT starts FROM floor)
{_CORRELATED_TESTS}
        ORDER BY b.gateway_request_id COLLATE "C"
        ON CONFLICT (gateway_request_id) DO UPDATE SET counted = true
        WHERE NOT w.counted
          AND (w.tenant_id, w.deployment_id, w.input_tokens, w.output_tokens,
               w.cached_input_tokens, w.reasoning_tokens, w.total_tokens,
               w.customer_charge_usd, w.occurred_at)
              IS NOT DISTINCT FROM
              (EXCLUDED.tenant_id, EXCLUDED.deployment_id, EXCLUDED.input_tokens,
               EXCLUDED.output_tokens, EXCLUDED.cached_input_tokens, EXCLUDED.reasoning_tokens,
               EXCLUDED.total_tokens, EXCLUDED.customer_charge_usd, EXCLUDED.occurred_at)
        RETURNING w.gateway_request_id
    )
    DELETE FROM budget_event_batch AS b
    WHERE NOT EXISTS (
        SELECT FROM counted_now AS c WHERE c.gateway_request_id = b.gateway_request_id
    )
    RETURNING b.gateway_request_id
"""

# The same count in the form Citus accepts (storage/flavour.py says when): it refuses the
# correlated EXISTS between the session's staging table (on the coordinator) and a distributed
# table ("direct joins between distributed and local tables are not supported"). Each test is a
# join of the staged rows with one table, in a CTE of its own (the coordinator sends the staged
# rows to the workers), and the staged rows are tested against the CTEs.
_JOINED_TESTS = """\
          AND b.gateway_request_id NOT IN (SELECT gateway_request_id FROM legacy)
          AND (b.gateway_request_id IN (SELECT gateway_request_id FROM in_window)
               OR b.gateway_request_id NOT IN (SELECT gateway_request_id FROM stored))"""
_FLOOR_END = """
        FROM usage_event_months WHERE state = 'attached'
    ), counted_now AS ("""
_JOINS = """
        FROM usage_event_months WHERE state = 'attached'
    ), legacy AS (
        SELECT b.gateway_request_id FROM budget_event_batch AS b
        JOIN budget_counted_legacy AS l USING (gateway_request_id)
    ), in_window AS (
        SELECT b.gateway_request_id FROM budget_event_batch AS b
        JOIN usage_event_ids AS k USING (gateway_request_id)
    ), stored AS (
        SELECT b.gateway_request_id FROM budget_event_batch AS b
        JOIN llm_usage_events AS e ON e.tenant_id = b.tenant_id
            AND e.occurred_at = b.occurred_at AND e.gateway_request_id = b.gateway_request_id
    ), counted_now AS ("""


def _replaced(statement: str, old: str, new: str) -> str:
    if old not in statement:  # the single-node statement changed: change its Citus form too
        raise AssertionError(f"not in the statement: {old.strip()[:60]!r}")
    return statement.replace(old, new)


_COUNT_STAGED_CITUS = _replaced(
    _replaced(_COUNT_STAGED, _CORRELATED_TESTS, _JOINED_TESTS), _FLOOR_END, _JOINS
)


# Every scope an event names (its tenant, and each attribution that is not null), in its own
# UTC day and month; summed exactly (numeric); added to the counters in key order. The addition
# and the value after it come from one statement per row under the row's lock, so
# `before = after - increment` is exact even while another replica adds to the same counter.
# Only counters whose scope has a policy with a limit for their window come back, with it: the
# others cannot alert, and a batch touches thousands of counters. An event of a day before the
# budget horizon ($1, storage/budget_pruning.py) counts in no period: those are not evaluated.
#
# The rows summed are the batch's counted events (the staging table) and the signed charges
# of its corrections (design §6.5: the event's effective charge before a correction taken back,
# the one after it added), so an event and a correction of it in one batch cost one write of
# their counter. PostgreSQL checks `spend_usd >= 0` on the row an INSERT … ON CONFLICT proposes
# before it finds the conflict, so a counter whose sum is negative cannot ride the upsert: the
# upsert proposes 0 for it, which locks it in key order (the one lock order of every writer of
# these rows) without writing it (`WHERE … <> 0`), and the statement hands it back for
# `_LOWER` to subtract under that lock. `raised_usd`, the sum of the positive charges, bounds
# how high a counter went inside the batch: an event may cross a level that a correction after
# it takes back. A counter whose charges cancel exactly but went up on the way is handed back
# too, for `_LOWER` to read (the upsert neither writes nor returns it).
_SCOPES_OF_EVENT = ", ".join(f"('{scope.value}', b.{field})" for scope, field in SCOPE_FIELDS)
_WINDOWS = ", ".join(f"('{window.value}')" for window in BudgetWindow)
_COUNTED_SOURCE = """
        SELECT tenant_id, deployment_id, user_id, agent_id, day, charge_usd
        FROM budget_event_batch"""
_MOVES_SOURCE = """
        SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::date[],
                             $7::numeric[])
            AS m(tenant_id, deployment_id, user_id, agent_id, day, charge_usd)"""


def _add_to_counters(source: str) -> str:
    return f"""
    WITH contributions AS (
        SELECT b.tenant_id, s.scope_type, s.scope_id, w."window",
            CASE w."window" WHEN 'daily' THEN b.day
                ELSE date_trunc('month', b.day)::date END AS period_start,
            b.charge_usd
        FROM ({source}) AS b
        CROSS JOIN LATERAL (VALUES {_SCOPES_OF_EVENT}) AS s(scope_type, scope_id)
        CROSS JOIN (VALUES {_WINDOWS}) AS w("window")
        WHERE s.scope_id IS NOT NULL AND b.day >= $1
    ), increments AS (
        SELECT tenant_id, scope_type, scope_id, "window", period_start,
            sum(charge_usd) AS increment_usd,
            coalesce(sum(charge_usd) FILTER (WHERE charge_usd > 0), 0) AS raised_usd
        FROM contributions
        GROUP BY tenant_id, scope_type, scope_id, "window", period_start
    ), added AS (
        INSERT INTO budget_spend
            (tenant_id, scope_type, scope_id, "window", period_start, spend_usd)
        SELECT tenant_id, scope_type, scope_id, "window", period_start,
            greatest(increment_usd, 0)
        FROM increments
        ORDER BY tenant_id COLLATE "C", scope_type COLLATE "C", scope_id COLLATE "C",
            "window" COLLATE "C", period_start
        ON CONFLICT (tenant_id, scope_type, scope_id, "window", period_start)
            DO UPDATE SET spend_usd = budget_spend.spend_usd + EXCLUDED.spend_usd
            WHERE EXCLUDED.spend_usd <> 0
        RETURNING tenant_id, scope_type, scope_id, "window", period_start, spend_usd
    ), limited AS (
        SELECT added.*, i.increment_usd, i.raised_usd, p.warn_threshold_pct,
            CASE added."window" WHEN 'daily' THEN p.daily_limit_usd
                ELSE p.monthly_limit_usd END AS limit_usd
        FROM added
        JOIN increments AS i USING (tenant_id, scope_type, scope_id, "window", period_start)
        JOIN budget_policies AS p USING (tenant_id, scope_type, scope_id)
        WHERE i.increment_usd >= 0
    )
    SELECT tenant_id, scope_type, scope_id, "window", period_start, spend_usd, increment_usd,
        raised_usd, limit_usd, warn_threshold_pct
    FROM limited WHERE limit_usd IS NOT NULL
    UNION ALL
    SELECT tenant_id, scope_type, scope_id, "window", period_start, NULL, increment_usd,
        raised_usd, NULL, NULL
    FROM increments WHERE increment_usd < 0 OR (increment_usd = 0 AND raised_usd > 0)
"""


_ADD_STAGED_TO_COUNTERS = _add_to_counters(_COUNTED_SOURCE)
_ADD_MOVES_TO_COUNTERS = _add_to_counters(_MOVES_SOURCE)
_ADD_BOTH_TO_COUNTERS = _add_to_counters(f"{_COUNTED_SOURCE}\n        UNION ALL{_MOVES_SOURCE}")
# The counters whose sum is negative, lowered under the locks the upsert took, and those whose
# charges cancelled, read under them (a new statement, so its snapshot holds what was locked).
# A counter that held less (a bug: a correction takes back only what was counted) fails the
# CHECK instead of going below 0.
_MOVED_KEYS = """unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::date[], $6::numeric[])
            AS m(tenant_id, scope_type, scope_id, "window", period_start, delta_usd)"""
_MOVED_ROW = """s.tenant_id = m.tenant_id AND s.scope_type = m.scope_type
          AND s.scope_id = m.scope_id AND s."window" = m."window"
          AND s.period_start = m.period_start"""
_LOWER = f"""
    WITH lowered AS (
        UPDATE budget_spend AS s SET spend_usd = s.spend_usd + m.delta_usd
        FROM {_MOVED_KEYS}
        WHERE {_MOVED_ROW} AND m.delta_usd < 0
        RETURNING s.tenant_id, s.scope_type, s.scope_id, s."window", s.period_start, s.spend_usd
    ), cancelled AS (
        SELECT s.tenant_id, s.scope_type, s.scope_id, s."window", s.period_start, s.spend_usd
        FROM budget_spend AS s JOIN {_MOVED_KEYS} ON {_MOVED_ROW}
        WHERE m.delta_usd = 0
    ), moved AS (
        SELECT * FROM lowered UNION ALL SELECT * FROM cancelled
    )
    SELECT l.tenant_id, l.scope_type, l.scope_id, l."window", l.period_start, l.spend_usd,
        p.warn_threshold_pct,
        CASE l."window" WHEN 'daily' THEN p.daily_limit_usd ELSE p.monthly_limit_usd END
            AS limit_usd
    FROM moved AS l
    JOIN budget_policies AS p USING (tenant_id, scope_type, scope_id)
"""

StagedEvent = tuple[
    str, str, str | None, str | None, str | None, date, Decimal, int, int, int, int, int, datetime
]


async def stage_events(connection: Connection, events: Iterable[StagedEvent]) -> None:
    """Hand a batch's events (one per id, in `STAGED_EVENT_COLUMNS`) to this transaction."""
    await connection.execute(_STAGE_EVENTS)
    await connection.copy_records_to_table(
        "budget_event_batch", records=events, columns=STAGED_EVENT_COLUMNS
    )


async def count_staged_events(connection: Connection, *, citus: bool = False) -> set[str]:
    """Mark the staged first copies counted in the id window, keep staged only those, and
    return the ids of the others (counted before, a conflicting copy, or expired). `citus`: the
    database is a Citus coordinator."""
    statement = _COUNT_STAGED_CITUS if citus else _COUNT_STAGED
    return {row[0] for row in await connection.fetch(statement)}


class LimitedCounter(NamedTuple):
    """A counter whose scope has a policy with a limit for its window, around a batch's addition."""

    before_usd: Decimal
    after_usd: Decimal
    limit_usd: Decimal
    warn_threshold_pct: int
    # At least the most it reached inside the batch (before + the positive charges), when the
    # batch's charges were not all positive (a correction took some back); None: `after_usd`.
    peak_usd: Decimal | None = None


class ChargeMove(NamedTuple):
    """A signed charge to the counters of every scope it names, in its UTC day and month: half
    of what a correction moves (consumers/budget/counting.py's `correction_moves`)."""

    gateway_request_id: str
    tenant_id: str
    deployment_id: str | None
    user_id: str | None
    agent_id: str | None
    occurred_at: datetime
    customer_charge_usd: Decimal


def _moves_arguments(moves: Sequence[ChargeMove]) -> list[list[object]]:
    return [
        [m.tenant_id for m in moves],
        [m.deployment_id for m in moves],
        [m.user_id for m in moves],
        [m.agent_id for m in moves],
        [utc_day(m.occurred_at) for m in moves],
        [m.customer_charge_usd for m in moves],
    ]


async def add_to_counters(
    connection: Connection,
    *,
    evaluated_from: date,
    staged: bool,
    moves: Sequence[ChargeMove] = (),
) -> dict[SpendKey, LimitedCounter]:
    """Add the staged events (`staged`: the transaction staged some) and then the signed `moves`
    of days from `evaluated_from` on to every counter they touch (creating it at 0). Return, for
    every counter they touch whose scope's policy sets a limit for its window, its value before
    and after, that limit, and its peak when some charge was negative. A key is (tenant_id,
    scope_type, scope_id, window, period_start)."""
    if moves:
        statement = _ADD_BOTH_TO_COUNTERS if staged else _ADD_MOVES_TO_COUNTERS
        arguments = _moves_arguments(moves)
    elif staged:
        statement, arguments = _ADD_STAGED_TO_COUNTERS, []
    else:
        return {}
    subtract, add = EXACT_CONTEXT.subtract, EXACT_CONTEXT.add
    limited: dict[SpendKey, LimitedCounter] = {}
    lowered: dict[SpendKey, tuple[Decimal, Decimal]] = {}  # falling, or cancelled out
    for row in await connection.fetch(statement, evaluated_from, *arguments):
        tenant_id, scope_type, scope_id, window, start, after, increment, raised, limit, pct = row
        key = (tenant_id, scope_type, scope_id, window, start)
        if after is None:
            lowered[key] = (increment, raised)
            continue
        before = subtract(after, increment)
        peak = None if raised == increment else add(before, raised)
        limited[key] = LimitedCounter(before, after, limit, pct, peak)
    for key in lowered.keys() & limited.keys():  # cancelled out on a row created at 0
        del lowered[key]
    if lowered:
        keys = sorted(lowered)
        columns: list[list[object]] = [[key[i] for key in keys] for i in range(5)]
        amounts = [lowered[key][0] for key in keys]
        for row in await connection.fetch(_LOWER, *columns, amounts):
            tenant_id, scope_type, scope_id, window, start, after, pct, limit = row
            if limit is not None:
                key = (tenant_id, scope_type, scope_id, window, start)
                increment, raised = lowered[key]
                before = subtract(after, increment)
                limited[key] = LimitedCounter(before, after, limit, pct, add(before, raised))
    return limited
