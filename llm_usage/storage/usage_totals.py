"""The exact daily pre-aggregate of stored usage, kept in the transaction that stores events."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from decimal import Decimal
from typing import Any

from llm_usage.core.errors import PipelineError
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
def _add_statement(late_tenants: str, late_days: str) -> str:
    return f"""
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
        FROM unnest({late_tenants}::text[], {late_days}::date[]) AS u(tenant_id, day)
        WHERE to_char(u.day, 'YYYY-MM') IN (SELECT period FROM invoice_periods)
    )
    INSERT INTO usage_late_marks AS m (tenant_id, period)
    SELECT tenant_id, period FROM late ORDER BY tenant_id COLLATE "C", period
    ON CONFLICT (tenant_id, period) DO UPDATE SET
        marked_at = EXCLUDED.marked_at, batches = m.batches + 1
"""


_ADD = _add_statement("$1", "$3")
# The same upsert for the keys that only grow, with the late marks of every key moved (the
# ones that shrink too: a correction of a closed month is late usage, design §5.3).
_ADD_MARKING_ALL = _add_statement("$9", "$10")


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
    await connection.execute(
        _ADD,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [totals[k].charge_usd for k in keys],
        [totals[k].input_tokens for k in keys],
        [totals[k].output_tokens for k in keys],
        [totals[k].requests for k in keys],
        [totals[k].estimated_charge_usd for k in keys],
    )


class MissingAggregateError(PipelineError):
    """A move would lower an aggregate row that does not exist: a bug, never retried."""


def _sorted_keys(keys: Iterable[TotalsKey]) -> list[TotalsKey]:
    return sorted(keys, key=lambda k: (k[0], k[1] is not None, k[1] or "", k[2]))


def _shrinks(usage: Usage) -> bool:
    return (
        usage.charge_usd < 0
        or usage.input_tokens < 0
        or usage.output_tokens < 0
        or usage.requests < 0
        or usage.estimated_charge_usd < 0
    )


# Every existing row of the keys, locked in key order (the order of the upsert's conflicts):
# a replica moving the same keys waits here rather than deadlocking half-way.
_LOCK_EXISTING = """
    SELECT 1 FROM usage_daily_totals AS t
    JOIN unnest($1::text[], $2::text[], $3::date[]) WITH ORDINALITY AS u(tenant_id, d, day, n)
      ON t.tenant_id = u.tenant_id AND t.deployment_id IS NOT DISTINCT FROM u.d
     AND t.day = u.day
    ORDER BY u.n
    FOR UPDATE OF t
"""
# A signed move of rows that exist (they hold the contribution being removed). An upsert cannot
# do it: PostgreSQL checks the proposed row's CHECK (>= 0) before it finds the conflict.
_MOVE_EXISTING = """
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
    RETURNING 1
"""


async def lower_existing(
    connection: Connection,
    *,
    lock: tuple[str, Sequence[Any]],
    move: tuple[str, Sequence[Any]],
    what: str,
) -> None:
    """Lock every existing row of a move's keys (`lock`: a statement locking them in key
    order, and its arguments), then move the rows that shrink in place (`move`: an UPDATE
    returning a row for each of them); one not found is a bug, never retried."""
    await connection.execute(lock[0], *lock[1])
    moved = await connection.fetch(move[0], *move[1])
    expected = len(move[1][0])
    if len(moved) != expected:
        raise MissingAggregateError(
            f"{expected - len(moved)} rows of {what} to lower do not exist: a correction "
            "removed usage that was never added"
        )


def _figures(keys: list[TotalsKey], net: Mapping[TotalsKey, Usage]) -> list[list[Any]]:
    return [
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [net[k].charge_usd for k in keys],
        [net[k].input_tokens for k in keys],
        [net[k].output_tokens for k in keys],
        [net[k].requests for k in keys],
        [net[k].estimated_charge_usd for k in keys],
    ]


async def move_daily_totals(connection: Connection, net: Mapping[TotalsKey, Usage]) -> None:
    """Move the pre-aggregate by signed sums (a batch's events plus its corrections' deltas),
    and mark the closed months any of them touches; for batches with corrections only.

    Keys that shrink in any figure are updated in place after every existing row of `net` is
    locked in key order; the others go through the usual upsert.
    """
    keys = _sorted_keys(k for k, usage in net.items() if usage != Usage())
    if not keys:
        return
    await lock_months_shared(connection, (k[2] for k in keys))
    shrinking = [k for k in keys if _shrinks(net[k])]
    growing = [k for k in keys if not _shrinks(net[k])]
    if shrinking:
        await lower_existing(
            connection,
            lock=(_LOCK_EXISTING, _figures(keys, net)[:3]),
            move=(_MOVE_EXISTING, _figures(shrinking, net)),
            what="daily totals",
        )
    await connection.execute(
        _ADD_MARKING_ALL, *_figures(growing, net), [k[0] for k in keys], [k[2] for k in keys]
    )
