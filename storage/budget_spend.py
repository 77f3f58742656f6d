"""The budget consumer's own tables: the ids it has counted and the spend counters.

Every write takes rows in sorted order, so two replicas touching the same ids or counters lock
them in the same order and cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal

from llm_usage.schemas.budget import SpendKey
from llm_usage.schemas.money import EXACT_CONTEXT
from llm_usage.storage.pool import Connection

_RECORD_COUNTED = """
    INSERT INTO budget_counted_events (gateway_request_id)
    SELECT id FROM unnest($1::text[]) WITH ORDINALITY AS u(id, n) ORDER BY n
    ON CONFLICT (gateway_request_id) DO NOTHING
    RETURNING gateway_request_id
"""

# The addition and the value after it come from one statement per row under the row's lock, so
# `before = after - increment` is exact even while another replica adds to the same counter.
_ADD_TO_COUNTERS = """
    INSERT INTO budget_spend (tenant_id, scope_type, scope_id, "window", period_start, spend_usd)
    SELECT tenant_id, scope_type, scope_id, "window", period_start, spend_usd
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::date[], $6::numeric[])
        WITH ORDINALITY AS u(tenant_id, scope_type, scope_id, "window", period_start, spend_usd, n)
    ORDER BY n
    ON CONFLICT (tenant_id, scope_type, scope_id, "window", period_start)
        DO UPDATE SET spend_usd = budget_spend.spend_usd + EXCLUDED.spend_usd
    RETURNING tenant_id, scope_type, scope_id, "window", period_start, spend_usd
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
    """Remember these ids as counted; return those that were not counted before."""
    rows = await connection.fetch(_RECORD_COUNTED, sorted(set(gateway_request_ids)))
    return {row["gateway_request_id"] for row in rows}


async def add_to_counters(
    connection: Connection, increments: Mapping[SpendKey, Decimal]
) -> dict[SpendKey, Decimal]:
    """Add each increment to its counter (creating it at 0); return each counter's value before.

    A key is (tenant_id, scope_type, scope_id, window, period_start): its natural order is the
    lock order."""
    keys = sorted(increments)
    tenants, scope_types, scope_ids, windows, starts = (
        zip(*keys, strict=True) if keys else ((),) * 5
    )
    rows = await connection.fetch(
        _ADD_TO_COUNTERS,
        tenants,
        scope_types,
        scope_ids,
        windows,
        starts,
        [increments[key] for key in keys],
    )
    subtract = EXACT_CONTEXT.subtract
    before: dict[SpendKey, Decimal] = {}
    for tenant_id, scope_type, scope_id, window, start, spend_usd in rows:
        key = (tenant_id, scope_type, scope_id, window, start)
        before[key] = subtract(spend_usd, increments[key])
    return before


async def prune_counted_ids(connection: Connection, *, older_than_hours: int, limit: int) -> int:
    """Forget up to `limit` counted ids older than the retention; return how many."""
    status = await connection.execute(_PRUNE_COUNTED, older_than_hours, limit)
    return int(status.rsplit(" ", 1)[-1])
