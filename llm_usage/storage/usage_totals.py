"""The exact daily pre-aggregate of stored usage, kept in the transaction that stores events."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date
from decimal import Decimal
from typing import Any

from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.domain.usage import Usage
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.pool import Connection

TotalsKey = tuple[str, str | None, date]  # tenant_id, deployment_id, UTC day


def daily_totals(events: Iterable[UsageRow]) -> dict[TotalsKey, Usage]:
    """Exact sums per (tenant, deployment, UTC day) of `events`."""
    # Summed in place in plain lists (a batch has thousands of events), then made values.
    sums: dict[TotalsKey, list[Any]] = {}
    add = EXACT_CONTEXT.add
    for event in events:
        # Decoding put occurred_at in UTC already.
        key = (event.tenant_id, event.deployment_id, event.occurred_at.date())
        found = sums.get(key)
        charge = event.customer_charge_usd
        estimated = charge if event.charge_estimated else _ZERO
        if found is None:
            sums[key] = [charge, event.input_tokens, event.output_tokens, 1, estimated]
        else:
            found[0] = add(found[0], charge)
            found[1] += event.input_tokens
            found[2] += event.output_tokens
            found[3] += 1
            found[4] = add(found[4], estimated)
    return {key: Usage(*values) for key, values in sums.items()}


_ZERO = Decimal(0)


# A month's lock (two-int4 advisory key: this class, the month's index): a batch takes it shared
# for every month it adds to, before its upsert; the close of a month takes it exclusively. So a
# batch either commits before the close reads the month (its usage is in the final lines) or
# waits for the close to commit, and then its upsert (a later statement, a later snapshot) sees
# the month closed and marks it. Current-month batches never wait for the close of a past month.
MONTH_LOCK_CLASS = 0x6C6C6D4D  # "llmM"


def month_lock_id(day: date) -> int:
    """The month's key within `MONTH_LOCK_CLASS`."""
    return day.year * 12 + day.month - 1


async def lock_month_exclusively(connection: Connection, day: date) -> None:
    """Hold the lock of `day`'s month exclusively for the rest of the transaction: usage batches
    adding to the month wait, and the ones under way have committed once it is held."""
    await connection.execute(
        "SELECT pg_advisory_xact_lock($1, $2)", MONTH_LOCK_CLASS, month_lock_id(day)
    )


_LOCK_MONTHS = """
    SELECT pg_advisory_xact_lock_shared($1, m) FROM unnest($2::int[]) AS u(m) ORDER BY m
"""

# Rows in sorted key order, so replicas adding to the same days lock them in the same order. The
# same statement marks each (tenant, closed month) it adds to: late usage the rollup trues up.
# `updated_at` is no longer set: no indexed column changes, so the update can be HOT. Runs as is
# on a Citus coordinator too (tables distributed on tenant_id, invoice_periods local); there a
# DO UPDATE may use no function that is not IMMUTABLE (hence no now()), and a join of the batch's
# rows with invoice_periods under the DISTINCT loses its collation (hence IN).
_ADD = """
    WITH added AS (
        INSERT INTO usage_daily_totals AS t
            (tenant_id, deployment_id, day, charge_usd, input_tokens, output_tokens, requests,
             estimated_charge_usd)
        SELECT tenant_id, deployment_id, day, charge_usd, input_tokens, output_tokens, requests,
               estimated_charge_usd
        FROM unnest($1::text[], $2::text[], $3::date[], $4::numeric[], $5::bigint[],
                    $6::bigint[], $7::bigint[], $8::numeric[])
            WITH ORDINALITY
            AS u(tenant_id, deployment_id, day, charge_usd, input_tokens, output_tokens,
                 requests, estimated_charge_usd, n)
        ORDER BY n
        ON CONFLICT ON CONSTRAINT usage_daily_totals_key DO UPDATE SET
            charge_usd = t.charge_usd + EXCLUDED.charge_usd,
            input_tokens = t.input_tokens + EXCLUDED.input_tokens,
            output_tokens = t.output_tokens + EXCLUDED.output_tokens,
            requests = t.requests + EXCLUDED.requests,
            estimated_charge_usd = t.estimated_charge_usd + EXCLUDED.estimated_charge_usd
    ), late AS (
        SELECT DISTINCT u.tenant_id, to_char(u.day, 'YYYY-MM') AS period
        FROM unnest($1::text[], $3::date[]) AS u(tenant_id, day)
        WHERE to_char(u.day, 'YYYY-MM') IN (SELECT period FROM invoice_periods)
    )
    INSERT INTO usage_late_marks AS m (tenant_id, period)
    SELECT tenant_id, period FROM late ORDER BY tenant_id COLLATE "C", period
    ON CONFLICT (tenant_id, period) DO UPDATE SET
        marked_at = EXCLUDED.marked_at, batches = m.batches + 1
"""


# The rising step of a move (`move_daily_totals`): the same upsert, but a row whose rising
# figures are all 0 (it only falls) is locked in key order without being written; `_LOWER`
# writes it once.
_LAST_SET = """
            estimated_charge_usd = t.estimated_charge_usd + EXCLUDED.estimated_charge_usd
    ), late AS ("""
_RAISE = _ADD.replace(
    _LAST_SET,
    """
            estimated_charge_usd = t.estimated_charge_usd + EXCLUDED.estimated_charge_usd
        WHERE EXCLUDED.charge_usd <> 0 OR EXCLUDED.input_tokens <> 0
           OR EXCLUDED.output_tokens <> 0 OR EXCLUDED.requests <> 0
           OR EXCLUDED.estimated_charge_usd <> 0
    ), late AS (""",
)
if _RAISE == _ADD:  # _ADD changed: change its rising form too
    raise AssertionError("the rising form of usage_totals' upsert no longer applies")


async def lock_months_shared(connection: Connection, days: Iterable[date]) -> None:
    """Take the shared lock of every month of `days`, in order, for the rest of the transaction:
    what a batch does before it adds to those months (or marks them late)."""
    await connection.execute(
        _LOCK_MONTHS, MONTH_LOCK_CLASS, sorted({month_lock_id(day) for day in days})
    )


async def add_to_daily_totals(connection: Connection, totals: Mapping[TotalsKey, Usage]) -> None:
    """Add newly stored events' sums to the pre-aggregate, and mark the closed months they add
    to; two statements (the months' locks, then the upsert), in the caller's transaction."""
    if not totals:
        return
    keys = _sorted_keys(totals)
    await lock_months_shared(connection, (k[2] for k in keys))
    await connection.execute(_ADD, *_columns(keys, totals))


def _sorted_keys(keys: Iterable[TotalsKey]) -> list[TotalsKey]:
    return sorted(keys, key=lambda k: (k[0], k[1] is not None, k[1] or "", k[2]))


def _columns(keys: list[TotalsKey], totals: Mapping[TotalsKey, Usage]) -> list[list[Any]]:
    return [
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [totals[k].charge_usd for k in keys],
        [totals[k].input_tokens for k in keys],
        [totals[k].output_tokens for k in keys],
        [totals[k].requests for k in keys],
        [totals[k].estimated_charge_usd for k in keys],
    ]


def _rising(usage: Usage) -> Usage:
    return Usage(*(max(figure, 0) for figure in _figures(usage)))


def _falling(usage: Usage) -> Usage:
    return Usage(*(min(figure, 0) for figure in _figures(usage)))


def _figures(usage: Usage) -> tuple[Any, ...]:
    return (
        usage.charge_usd,
        usage.input_tokens,
        usage.output_tokens,
        usage.requests,
        usage.estimated_charge_usd,
    )


# The falling parts of rows the same transaction's upsert has just locked (or created, at zero):
# an upsert cannot lower a row, since PostgreSQL checks the proposed row's CHECK (>= 0) before it
# finds the conflict. A row lowered below zero is refused by that CHECK: a correction removing
# what was never added, a bug. UPDATE ... FROM unnest runs on a Citus coordinator as it is (as
# budget_holds' settling does).
_LOWER = """
    UPDATE usage_daily_totals AS t SET
        charge_usd = t.charge_usd + u.charge_usd,
        input_tokens = t.input_tokens + u.input_tokens,
        output_tokens = t.output_tokens + u.output_tokens,
        requests = t.requests + u.requests,
        estimated_charge_usd = t.estimated_charge_usd + u.estimated_charge_usd
    FROM unnest($1::text[], $2::text[], $3::date[], $4::numeric[], $5::bigint[], $6::bigint[],
                $7::bigint[], $8::numeric[])
        AS u(tenant_id, d, day, charge_usd, input_tokens, output_tokens, requests,
             estimated_charge_usd)
    WHERE t.tenant_id = u.tenant_id AND t.deployment_id IS NOT DISTINCT FROM u.d
      AND t.day = u.day
"""


async def move_daily_totals(connection: Connection, net: Mapping[TotalsKey, Usage]) -> None:
    """Move the pre-aggregate by signed sums (a batch's events plus its corrections' deltas),
    marking the closed months any of them touches; for batches with corrections only.

    Two statements after the months' locks: the upsert of every key's rising figures (it locks
    every row in key order, as a plain batch does, writes only those that rise, and marks the
    late months), then the update of the falling figures of the rows it locked.
    """
    keys = _sorted_keys(k for k, usage in net.items() if usage != Usage())
    if not keys:
        return
    await lock_months_shared(connection, (k[2] for k in keys))
    # Only a correction's key can fall (a few in a batch): the others rise as they are.
    lowered = [k for k in keys if min(_figures(net[k])) < 0]
    rising = {**net, **{k: _rising(net[k]) for k in lowered}}
    await connection.execute(_RAISE, *_columns(keys, rising))
    if lowered:
        await connection.execute(_LOWER, *_columns(lowered, {k: _falling(net[k]) for k in lowered}))
