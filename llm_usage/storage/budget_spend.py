"""The budget consumer's own tables: the ids it has counted and the spend counters.

Every write takes rows in sorted order, so two replicas touching the same ids or counters lock
them in the same order and cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from decimal import Decimal
from typing import NamedTuple

from llm_usage.domain.budgets import SCOPE_FIELDS, BudgetWindow, SpendKey
from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.storage.pool import Connection

# A batch's events reach PostgreSQL by one binary COPY into a session-local staging table (it
# empties at every commit), one row an event; PostgreSQL then expands each event into its
# counters and sums them. Every ORDER BY sorts text by code point (COLLATE "C"), as Python
# sorts: the lock order is the same whichever replica, and whichever release, takes the locks.
_STAGE_EVENTS = """
    CREATE TEMP TABLE IF NOT EXISTS budget_event_batch (
        gateway_request_id text, tenant_id text, deployment_id text, user_id text,
        agent_id text, day date, charge_usd numeric
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
)

# Records the staged ids as counted; the ones counted before leave the staging table and come
# back (few: the replays).
_COUNT_STAGED = """
    WITH counted_now AS (
        INSERT INTO budget_counted_events (gateway_request_id)
        SELECT gateway_request_id FROM budget_event_batch
        ORDER BY gateway_request_id COLLATE "C"
        ON CONFLICT (gateway_request_id) DO NOTHING
        RETURNING gateway_request_id
    )
    DELETE FROM budget_event_batch AS b
    WHERE NOT EXISTS (
        SELECT FROM counted_now AS c WHERE c.gateway_request_id = b.gateway_request_id
    )
    RETURNING b.gateway_request_id
"""

# Every scope an event names (its tenant, and each attribution that is not null), in its own
# UTC day and month; summed exactly (numeric); added to the counters in key order. The addition
# and the value after it come from one statement per row under the row's lock, so
# `before = after - increment` is exact even while another replica adds to the same counter.
# Only counters whose scope has a policy with a limit for their window come back, with it: the
# others cannot alert, and a batch touches thousands of counters.
_SCOPES_OF_EVENT = ", ".join(f"('{scope.value}', b.{field})" for scope, field in SCOPE_FIELDS)
_WINDOWS = ", ".join(f"('{window.value}')" for window in BudgetWindow)
_ADD_STAGED_TO_COUNTERS = f"""
    WITH contributions AS (
        SELECT b.tenant_id, s.scope_type, s.scope_id, w."window",
            CASE w."window" WHEN 'daily' THEN b.day
                ELSE date_trunc('month', b.day)::date END AS period_start,
            b.charge_usd
        FROM budget_event_batch AS b
        CROSS JOIN LATERAL (VALUES {_SCOPES_OF_EVENT}) AS s(scope_type, scope_id)
        CROSS JOIN (VALUES {_WINDOWS}) AS w("window")
        WHERE s.scope_id IS NOT NULL
    ), increments AS (
        SELECT tenant_id, scope_type, scope_id, "window", period_start,
            sum(charge_usd) AS increment_usd
        FROM contributions
        GROUP BY tenant_id, scope_type, scope_id, "window", period_start
    ), added AS (
        INSERT INTO budget_spend
            (tenant_id, scope_type, scope_id, "window", period_start, spend_usd)
        SELECT tenant_id, scope_type, scope_id, "window", period_start, increment_usd
        FROM increments
        ORDER BY tenant_id COLLATE "C", scope_type COLLATE "C", scope_id COLLATE "C",
            "window" COLLATE "C", period_start
        ON CONFLICT (tenant_id, scope_type, scope_id, "window", period_start)
            DO UPDATE SET spend_usd = budget_spend.spend_usd + EXCLUDED.spend_usd
        RETURNING tenant_id, scope_type, scope_id, "window", period_start, spend_usd
    ), limited AS (
        SELECT added.*, i.increment_usd, p.warn_threshold_pct,
            CASE added."window" WHEN 'daily' THEN p.daily_limit_usd
                ELSE p.monthly_limit_usd END AS limit_usd
        FROM added
        JOIN increments AS i USING (tenant_id, scope_type, scope_id, "window", period_start)
        JOIN budget_policies AS p USING (tenant_id, scope_type, scope_id)
    )
    SELECT tenant_id, scope_type, scope_id, "window", period_start, spend_usd, increment_usd,
        limit_usd, warn_threshold_pct
    FROM limited WHERE limit_usd IS NOT NULL
"""

_PRUNE_COUNTED = """
    DELETE FROM budget_counted_events
    WHERE gateway_request_id IN (
        SELECT gateway_request_id FROM budget_counted_events
        WHERE counted_at < now() - make_interval(hours => $1)
        LIMIT $2
    )
"""


StagedEvent = tuple[str, str, str | None, str | None, str | None, date, Decimal]


async def stage_events(connection: Connection, events: Iterable[StagedEvent]) -> None:
    """Hand a batch's events (one per id, in `STAGED_EVENT_COLUMNS`) to this transaction."""
    await connection.execute(_STAGE_EVENTS)
    await connection.copy_records_to_table(
        "budget_event_batch", records=events, columns=STAGED_EVENT_COLUMNS
    )


async def count_staged_events(connection: Connection) -> set[str]:
    """Remember the staged ids as counted, keep staged only the events not counted before, and
    return the ids that were."""
    return {row[0] for row in await connection.fetch(_COUNT_STAGED)}


class LimitedCounter(NamedTuple):
    """A counter whose scope has a policy with a limit for its window, around a batch's addition."""

    before_usd: Decimal
    after_usd: Decimal
    limit_usd: Decimal
    warn_threshold_pct: int


async def add_staged_to_counters(connection: Connection) -> dict[SpendKey, LimitedCounter]:
    """Add the staged events to every counter they touch (creating it at 0). Return, for every
    counter whose scope's policy sets a limit for its window, its value before and after, and
    that limit. A key is (tenant_id, scope_type, scope_id, window, period_start)."""
    subtract = EXACT_CONTEXT.subtract
    limited: dict[SpendKey, LimitedCounter] = {}
    for row in await connection.fetch(_ADD_STAGED_TO_COUNTERS):
        tenant_id, scope_type, scope_id, window, start, after, increment, limit, pct = row
        key = (tenant_id, scope_type, scope_id, window, start)
        limited[key] = LimitedCounter(subtract(after, increment), after, limit, pct)
    return limited


async def prune_counted_ids(connection: Connection, *, older_than_hours: int, limit: int) -> int:
    """Forget up to `limit` counted ids older than the retention; return how many."""
    status = await connection.execute(_PRUNE_COUNTED, older_than_hours, limit)
    return int(status.rsplit(" ", 1)[-1])
