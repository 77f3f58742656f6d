"""Period charges in `period_charges`: stored once per (tenant, id), read back by the usage
consumer to judge copies and by the rollup to bill a month."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from llm_usage.domain.period_charges import PeriodCharge
from llm_usage.domain.periods import parse_period
from llm_usage.storage.pool import Connection
from llm_usage.storage.usage_totals import lock_months_shared

# (tenant_id, period_charge_id): a period charge's identity.
PeriodChargeKey = tuple[str, str]

_INSERT_NEW = """
    INSERT INTO period_charges
        (tenant_id, period_charge_id, deployment_id, period, period_charge_usd, occurred_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[],
                         $6::timestamptz[])
    ON CONFLICT (tenant_id, period_charge_id) DO NOTHING
    RETURNING tenant_id, period_charge_id
"""

# A charge stored for a month already closed is billed as an adjustment in the first open month
# after it, as late usage is: the same mark (migration 0010), under the same month lock.
_MARK_LATE = """
    WITH late AS (
        SELECT DISTINCT u.tenant_id, u.period
        FROM unnest($1::text[], $2::text[]) AS u(tenant_id, period)
        WHERE u.period IN (SELECT period FROM invoice_periods)
    )
    INSERT INTO usage_late_marks AS m (tenant_id, period)
    SELECT tenant_id, period FROM late ORDER BY tenant_id COLLATE "C", period
    ON CONFLICT (tenant_id, period) DO UPDATE SET
        marked_at = EXCLUDED.marked_at, batches = m.batches + 1
"""

_COLUMNS = "tenant_id, period_charge_id, deployment_id, period, period_charge_usd, occurred_at"


async def insert_new_period_charges(
    connection: Connection, charges: Sequence[PeriodCharge]
) -> set[PeriodChargeKey]:
    """Insert the charges whose (tenant, id) is not stored yet, and mark the closed months they
    are for; return the keys inserted. Keys must be unique within `charges`; a stored row is
    never touched."""
    if not charges:
        return set()
    ordered = sorted(charges, key=lambda c: (c.tenant_id, c.period_charge_id))
    await lock_months_shared(connection, (parse_period(c.period) for c in ordered))
    rows = await connection.fetch(
        _INSERT_NEW,
        [c.tenant_id for c in ordered],
        [c.period_charge_id for c in ordered],
        [c.deployment_id for c in ordered],
        [c.period for c in ordered],
        [c.period_charge_usd for c in ordered],
        [c.occurred_at for c in ordered],
    )
    inserted = {(row["tenant_id"], row["period_charge_id"]) for row in rows}
    new = [c for c in ordered if (c.tenant_id, c.period_charge_id) in inserted]
    if new:
        await connection.execute(_MARK_LATE, [c.tenant_id for c in new], [c.period for c in new])
    return inserted


async def stored_period_charges(
    connection: Connection, keys: Sequence[PeriodChargeKey]
) -> dict[PeriodChargeKey, PeriodCharge]:
    """The stored charges of these keys (those that exist)."""
    if not keys:
        return {}
    rows = await connection.fetch(
        f"SELECT {_COLUMNS} FROM period_charges "
        "WHERE tenant_id = ANY($1::text[]) AND period_charge_id = ANY($2::text[])",
        sorted({tenant for tenant, _ in keys}),
        sorted({charge_id for _, charge_id in keys}),
    )
    wanted = set(keys)
    found = (_stored(row) for row in rows)
    return {
        (c.tenant_id, c.period_charge_id): c
        for c in found
        if (c.tenant_id, c.period_charge_id) in wanted
    }


async def period_charges_of_month(
    connection: Connection, *, period: str, tenants: Sequence[str] | None
) -> list[PeriodCharge]:
    """Every stored charge for the month `period` (of these tenants; all when None)."""
    rows = await connection.fetch(
        f"SELECT {_COLUMNS} FROM period_charges "
        "WHERE period = $1 AND ($2::text[] IS NULL OR tenant_id = ANY($2::text[]))",
        period,
        None if tenants is None else list(tenants),
    )
    return [_stored(row) for row in rows]


def _stored(row: asyncpg.Record) -> PeriodCharge:
    return PeriodCharge(**dict(row))
