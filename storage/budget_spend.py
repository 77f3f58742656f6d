"""The budget consumer's own tables: the ids it has counted and the spend counters.

Every write takes rows in sorted order, so two replicas touching the same ids or counters lock
them in the same order and cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import NamedTuple

from llm_usage.schemas.budget import SpendKey
from llm_usage.schemas.money import EXACT_CONTEXT
from llm_usage.storage.pool import Connection

# A batch's ids and increments reach PostgreSQL by binary COPY into session-local staging
# tables: as array parameters, asyncpg type-checks every element through Python's ABCs (~30
# checks an event, ~10 % of the consumer's CPU). The staging tables empty at every commit.
_STAGE_COUNTED = """
    CREATE TEMP TABLE IF NOT EXISTS budget_counted_batch (n integer, gateway_request_id text)
        ON COMMIT DELETE ROWS
"""
_STAGE_SPEND = """
    CREATE TEMP TABLE IF NOT EXISTS budget_spend_batch (
        n integer, tenant_id text, scope_type text, scope_id text, "window" text,
        period_start date, spend_usd numeric
    ) ON COMMIT DELETE ROWS
"""

_RECORD_COUNTED = """
    INSERT INTO budget_counted_events (gateway_request_id)
    SELECT gateway_request_id FROM budget_counted_batch ORDER BY n
    ON CONFLICT (gateway_request_id) DO NOTHING
    RETURNING gateway_request_id
"""

# The addition and the value after it come from one statement per row under the row's lock, so
# `before = after - increment` is exact even while another replica adds to the same counter.
# Only counters whose scope has a policy with a limit for their window come back, with it: the
# others cannot alert, and a batch touches thousands of counters.
_ADD_TO_COUNTERS = """
    WITH added AS (
        INSERT INTO budget_spend
            (tenant_id, scope_type, scope_id, "window", period_start, spend_usd)
        SELECT tenant_id, scope_type, scope_id, "window", period_start, spend_usd
        FROM budget_spend_batch ORDER BY n
        ON CONFLICT (tenant_id, scope_type, scope_id, "window", period_start)
            DO UPDATE SET spend_usd = budget_spend.spend_usd + EXCLUDED.spend_usd
        RETURNING tenant_id, scope_type, scope_id, "window", period_start, spend_usd
    ), limited AS (
        SELECT added.*, p.warn_threshold_pct,
            CASE added."window" WHEN 'daily' THEN p.daily_limit_usd
                ELSE p.monthly_limit_usd END AS limit_usd
        FROM added JOIN budget_policies AS p USING (tenant_id, scope_type, scope_id)
    )
    SELECT tenant_id, scope_type, scope_id, "window", period_start, spend_usd, limit_usd,
        warn_threshold_pct
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


async def record_counted_ids(
    connection: Connection, gateway_request_ids: Sequence[str]
) -> set[str]:
    """Remember these ids as counted; return those that were not counted before. Call it
    inside a transaction."""
    await connection.execute(_STAGE_COUNTED)
    await connection.copy_records_to_table(
        "budget_counted_batch",
        records=enumerate(sorted(set(gateway_request_ids))),
        columns=("n", "gateway_request_id"),
    )
    rows = await connection.fetch(_RECORD_COUNTED)
    return {row[0] for row in rows}


class LimitedCounter(NamedTuple):
    """A counter whose scope has a policy with a limit for its window, around a batch's addition."""

    before_usd: Decimal
    after_usd: Decimal
    limit_usd: Decimal
    warn_threshold_pct: int


async def add_to_counters(
    connection: Connection, increments: Mapping[SpendKey, Decimal]
) -> dict[SpendKey, LimitedCounter]:
    """Add each increment to its counter (creating it at 0). Return, for every counter whose
    scope's policy sets a limit for its window, its value before and after, and that limit.

    A key is (tenant_id, scope_type, scope_id, window, period_start): its natural order is the
    lock order. Call it inside a transaction."""
    if not increments:
        return {}
    await connection.execute(_STAGE_SPEND)
    await connection.copy_records_to_table(
        "budget_spend_batch",
        records=[(n, *key, increments[key]) for n, key in enumerate(sorted(increments))],
        columns=("n", "tenant_id", "scope_type", "scope_id", "window", "period_start", "spend_usd"),
    )
    rows = await connection.fetch(_ADD_TO_COUNTERS)
    subtract = EXACT_CONTEXT.subtract
    limited: dict[SpendKey, LimitedCounter] = {}
    for tenant_id, scope_type, scope_id, window, start, after, limit, pct in rows:
        key = (tenant_id, scope_type, scope_id, window, start)
        limited[key] = LimitedCounter(subtract(after, increments[key]), after, limit, pct)
    return limited


async def prune_counted_ids(connection: Connection, *, older_than_hours: int, limit: int) -> int:
    """Forget up to `limit` counted ids older than the retention; return how many."""
    status = await connection.execute(_PRUNE_COUNTED, older_than_hours, limit)
    return int(status.rsplit(" ", 1)[-1])
