"""Budget checks and their holds (issue 23): the check itself (`budget_check`, a function of
migration 0015, called in autocommit), the budget consumer's settlement inside its batch
transaction, and the sweeper that expires and forgets holds.

Every writer takes `budget_held` rows in the one lock order (`SpendKey` order, COLLATE "C"), so
checks, settlements and sweeps never deadlock (design §6).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import asyncpg

from llm_usage.core.errors import TransientError
from llm_usage.domain.budgets import SpendKey
from llm_usage.domain.holds import (
    DENY,
    EXPIRED,
    SETTLED,
    SETTLED_LATE,
    CheckOutcome,
    DeniedLimit,
    hold_counters,
)
from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.domain.periods import utc_day
from llm_usage.storage.pool import Connection, connection_from

# pg_try_advisory_lock key: "llm-usage hold sweep" — one sweeper per database at a time.
HOLD_SWEEP_LOCK_KEY: Final = 0x6C6C6D5F68737770
# Rows one sweeper transaction ends (per tenant), and tenants one round visits.
SWEEP_BATCH_ROWS: Final = 5_000
SWEEP_TENANTS: Final = 1_000
# The counted pass looks at open holds checked between this long ago and that plus two sweep
# intervals, so each is looked at about twice (design §5, step 3).
COUNTED_PASS_DELAY_SECONDS: Final = 10.0


class BudgetCheckBusy(TransientError):  # noqa: N818 - the name the route imports
    """The check waited longer than the function's lock_timeout (2 s) for its counters: the
    caller answers 503, to be retried with the same gateway_request_id."""


@dataclass(frozen=True)
class EndedHold:
    """One hold that ended now."""

    tenant_id: str
    gateway_request_id: str
    amount_usd: Decimal
    day: date
    charge_usd: Decimal | None  # the counted event's charge when settled
    how: str  # "settled" | "expired" | "settled_late"


@dataclass(frozen=True)
class SweepResult:
    ran: bool  # False when another replica held the sweep lock
    ended: list[EndedHold]  # expired + settled_late
    forgotten: int  # ended rows deleted
    open_holds: int  # open holds left
    oldest_open_age_seconds: float  # 0 when none


_REQUEST_COUNTED = """
    SELECT tenant_id FROM usage_event_ids WHERE gateway_request_id = $1 AND counted
"""


async def request_counted(connection: Connection, tenant_id: str, gateway_request_id: str) -> bool:
    """Whether the budget consumer has counted this tenant's event with this id (the id window
    is keyed on the id alone: the same id of another tenant is not this request)."""
    found = await connection.fetchval(_REQUEST_COUNTED, gateway_request_id)
    return found is not None and found == tenant_id


_FIRST_ANSWER = """
    SELECT decision AS o_decision, denied_by AS o_denied_by, expires_at AS o_expires_at,
           amount_usd AS o_amount_usd, true AS o_repeated
    FROM budget_holds WHERE tenant_id = $1 AND gateway_request_id = $2
"""


async def first_answer(
    connection: Connection, tenant_id: str, gateway_request_id: str
) -> CheckOutcome | None:
    """The answer a check of this request was given, while it is remembered: a repeat of a
    check whose event has since been counted still answers what it answered first."""
    row = await connection.fetchrow(_FIRST_ANSWER, tenant_id, gateway_request_id)
    return None if row is None else _outcome(row)


_CHECK = """
    SELECT o_decision, o_denied_by, o_expires_at, o_amount_usd, o_repeated
    FROM budget_check($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
"""


async def place_check(
    connection: Connection,
    *,
    tenant_id: str,
    gateway_request_id: str,
    deployment_id: str | None,
    user_id: str | None,
    agent_id: str | None,
    amount_usd: Decimal,
    now: datetime,
    hold_seconds: int,
) -> CheckOutcome:
    """Decide a check against the tenant's blocking limits and, when it is allowed, hold
    `amount_usd` on every counter its event would count toward, on `now`'s UTC day and month;
    a repeated id answers the first answer. One statement; call it outside a transaction, so
    the counters' locks are released as soon as it returns.

    BudgetCheckBusy when the counters stayed locked longer than 2 s."""
    counters = hold_counters(tenant_id, deployment_id, user_id, agent_id, utc_day(now))
    try:
        row = await connection.fetchrow(
            _CHECK,
            tenant_id,
            gateway_request_id,
            deployment_id,
            user_id,
            agent_id,
            utc_day(now),
            amount_usd,
            now,
            now + timedelta(seconds=hold_seconds),
            [key[1] for key in counters],
            [key[2] for key in counters],
            [key[3] for key in counters],
            [key[4] for key in counters],
        )
    except asyncpg.LockNotAvailableError as error:
        raise BudgetCheckBusy(
            f"the budget counters of tenant {tenant_id} stayed locked too long; "
            "try again with the same gateway_request_id"
        ) from error
    assert row is not None
    return _outcome(row)


def _outcome(row: asyncpg.Record) -> CheckOutcome:
    decision: str = row["o_decision"]
    return CheckOutcome(
        decision=decision,
        denied_by=_denied_limits(row["o_denied_by"]),
        hold_expires_at=None if decision == DENY else row["o_expires_at"],
        estimated_charge_usd=row["o_amount_usd"],
        answer="repeat" if row["o_repeated"] else "new",
    )


def _denied_limits(document: str | None) -> tuple[DeniedLimit, ...]:
    """The function's `denied_by` (jsonb, which asyncpg hands over as text), read exactly."""
    if document is None:
        return ()
    items: list[dict[str, Any]] = json.loads(document, parse_float=Decimal, parse_int=Decimal)
    limits = (
        DeniedLimit(
            scope_type=item["scope_type"],
            scope_id=item["scope_id"],
            window=item["window"],
            limit_usd=Decimal(item["limit_usd"]),
            spend_usd=Decimal(item["spend_usd"]),
            held_usd=Decimal(item["held_usd"]),
        )
        for item in items
    )
    return tuple(sorted(limits, key=DeniedLimit.order))


# Settlement, (1): this batch's open holds end; only ids this transaction counted now (their
# id-window rows are locked by it), so no other consumer competes for these rows.
_SETTLE = """
    UPDATE budget_holds AS h
    SET state = 'settled', ended_by = 'consumer', ended_at = $4, settled_charge_usd = u.charge
    FROM unnest($1::text[], $2::text[], $3::numeric[]) AS u(tenant_id, request_id, charge)
    WHERE h.tenant_id = u.tenant_id AND h.gateway_request_id = u.request_id AND h.state = 'open'
    RETURNING h.tenant_id, h.gateway_request_id, h.deployment_id, h.user_id, h.agent_id, h.day,
              h.amount_usd, u.charge
"""

# (2) what the ended holds held, summed per counter (a key once per statement: ON CONFLICT DO
# UPDATE cannot touch a row twice), added to ended_usd in lock order.
_ADD_ENDED = """
    INSERT INTO budget_held AS h (tenant_id, scope_type, scope_id, "window", period_start,
                                  ended_usd)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::date[],
                         $6::numeric[]) AS u(t, s, i, w, p, amount)
    ORDER BY t COLLATE "C", s COLLATE "C", i COLLATE "C", w COLLATE "C", p
    ON CONFLICT (tenant_id, scope_type, scope_id, "window", period_start)
        DO UPDATE SET ended_usd = h.ended_usd + EXCLUDED.ended_usd
"""


async def release_counted_holds(
    connection: Connection,
    counted: Sequence[tuple[str, str, Decimal]],
    *,
    now: datetime,
) -> list[EndedHold]:
    """End the open holds of the events this transaction counted for the first time (`counted`
    as (tenant_id, gateway_request_id, charge_usd)): `settled` by the consumer, their amounts
    added to `budget_held.ended_usd` in lock order. Call it inside the batch's transaction, as
    its last work before COMMIT, so that counting and release commit together."""
    if not counted:
        return []
    rows = await connection.fetch(
        _SETTLE,
        [tenant_id for tenant_id, _, _ in counted],
        [request_id for _, request_id, _ in counted],
        [charge for _, _, charge in counted],
        now,
    )
    await _add_ended(connection, rows)
    return [_ended(row, SETTLED, row["charge"]) for row in rows]


def _ended(row: asyncpg.Record, how: str, charge: Decimal | None) -> EndedHold:
    return EndedHold(
        tenant_id=row["tenant_id"],
        gateway_request_id=row["gateway_request_id"],
        amount_usd=row["amount_usd"],
        day=row["day"],
        charge_usd=charge,
        how=how,
    )


async def _add_ended(connection: Connection, rows: Sequence[asyncpg.Record]) -> None:
    """Add what the ended hold rows held to each of their counters' `ended_usd`."""
    sums: dict[SpendKey, Decimal] = {}
    for row in rows:
        for key in hold_counters(
            row["tenant_id"], row["deployment_id"], row["user_id"], row["agent_id"], row["day"]
        ):
            sums[key] = EXACT_CONTEXT.add(sums.get(key, Decimal(0)), row["amount_usd"])
    if not sums:
        return
    keys = sorted(sums)
    await connection.execute(
        _ADD_ENDED,
        [key[0] for key in keys],
        [key[1] for key in keys],
        [key[2] for key in keys],
        [key[3] for key in keys],
        [key[4] for key in keys],
        [sums[key] for key in keys],
    )


_TENANTS_EXPIRING = """
    SELECT DISTINCT tenant_id FROM budget_holds
    WHERE state = 'open' AND expires_at <= $1
    LIMIT $2
"""

# Open holds of one tenant to end, locked; a hold the budget consumer is settling right now is
# skipped (the consumer ends it), so the sweeper never waits.
_LOCK_ENDING = """
    SELECT tenant_id, gateway_request_id, deployment_id, user_id, agent_id, day, amount_usd
    FROM budget_holds
    WHERE tenant_id = $1 AND state = 'open' AND gateway_request_id = ANY($2::text[])
    ORDER BY gateway_request_id
    FOR UPDATE SKIP LOCKED
"""
_EXPIRED_IDS = """
    SELECT gateway_request_id FROM budget_holds
    WHERE tenant_id = $1 AND state = 'open' AND expires_at <= $2
    ORDER BY gateway_request_id
    LIMIT $3
"""
_COUNTED_CHARGES = """
    SELECT gateway_request_id, customer_charge_usd FROM usage_event_ids
    WHERE gateway_request_id = ANY($1::text[]) AND tenant_id = $2 AND counted
"""
_END_BY_SWEEPER = """
    UPDATE budget_holds AS h
    SET state = CASE WHEN u.counted THEN 'settled' ELSE 'expired' END, ended_by = 'sweeper',
        ended_at = $4, settled_charge_usd = u.charge
    FROM unnest($2::text[], $3::numeric[], $5::boolean[]) AS u(request_id, charge, counted)
    WHERE h.tenant_id = $1 AND h.gateway_request_id = u.request_id AND h.state = 'open'
"""
# The counted pass: open holds of any tenant checked in a recent window (by expires_at, on the
# partial index), to look up in the id window.
_RECENT_OPEN = """
    SELECT tenant_id, gateway_request_id FROM budget_holds
    WHERE state = 'open' AND expires_at > $1 AND expires_at <= $2
"""
_COUNTED_TENANTS = """
    SELECT gateway_request_id, tenant_id FROM usage_event_ids
    WHERE gateway_request_id = ANY($1::text[]) AND counted
"""
_FORGET = """
    DELETE FROM budget_holds WHERE state <> 'open' AND expires_at < $1
"""
_OPEN_SUMMARY = """
    SELECT count(*) AS open_holds, min(checked_at) AS oldest FROM budget_holds WHERE state = 'open'
"""


async def sweep_holds(
    pool: asyncpg.Pool,
    *,
    now: datetime,
    hold_seconds: int,
    sweep_seconds: float = 5.0,
) -> SweepResult:
    """One round of the sweeper, unless another replica is sweeping (then `ran` is False):
    end open holds that expired (`settled_late` when their event is found counted, `expired`
    otherwise), end recent open holds whose event is counted (`settled_late`: the check raced
    the batch that counted it), and forget ended rows past `expires_at + hold_seconds`.

    One connection: it holds the round's advisory lock (a session lock, unlocked at the end;
    if the round fails, the pool's reset of the connection unlocks it) and ends holds tenant by
    tenant, a short transaction each, so no check waits for the whole round."""
    async with connection_from(pool) as connection:
        if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", HOLD_SWEEP_LOCK_KEY):
            return SweepResult(False, [], 0, 0, 0.0)
        result = await _sweep_round(connection, now, hold_seconds, sweep_seconds)
        await connection.execute("SELECT pg_advisory_unlock($1)", HOLD_SWEEP_LOCK_KEY)
        return result


async def _sweep_round(
    connection: Connection, now: datetime, hold_seconds: int, sweep_seconds: float
) -> SweepResult:
    ended: list[EndedHold] = []
    for row in await connection.fetch(_TENANTS_EXPIRING, now, SWEEP_TENANTS):
        tenant_id = row["tenant_id"]
        while True:
            ids = [
                found["gateway_request_id"]
                for found in await connection.fetch(_EXPIRED_IDS, tenant_id, now, SWEEP_BATCH_ROWS)
            ]
            ended_now = await _end_holds(connection, tenant_id, ids, now)
            ended += ended_now
            # A full batch that ended nothing is locked by batches settling it: next round.
            if len(ids) < SWEEP_BATCH_ROWS or not ended_now:
                break
    ended += await _counted_pass(connection, now, hold_seconds, sweep_seconds)
    status = await connection.execute(_FORGET, now - timedelta(seconds=hold_seconds))
    summary = await connection.fetchrow(_OPEN_SUMMARY)
    assert summary is not None
    oldest: datetime | None = summary["oldest"]
    return SweepResult(
        ran=True,
        ended=ended,
        forgotten=int(status.rsplit(" ", 1)[-1]),
        open_holds=int(summary["open_holds"]),
        oldest_open_age_seconds=0.0 if oldest is None else max(0.0, (now - oldest).total_seconds()),
    )


async def _counted_pass(
    connection: Connection, now: datetime, hold_seconds: int, sweep_seconds: float
) -> list[EndedHold]:
    """End, as `settled_late`, the open holds checked about 10 s ago whose event is already
    counted: a check that read `counted = false` while the batch counting its id had not
    committed (design §5.1)."""
    newest_checked = now - timedelta(seconds=COUNTED_PASS_DELAY_SECONDS)
    oldest_checked = newest_checked - timedelta(seconds=2 * sweep_seconds)
    recent = await connection.fetch(
        _RECENT_OPEN,
        oldest_checked + timedelta(seconds=hold_seconds),
        newest_checked + timedelta(seconds=hold_seconds),
    )
    if not recent:
        return []
    counted = {
        (row["tenant_id"], row["gateway_request_id"])
        for row in await connection.fetch(
            _COUNTED_TENANTS, [row["gateway_request_id"] for row in recent]
        )
    }
    by_tenant: dict[str, list[str]] = {}
    for row in recent:
        if (row["tenant_id"], row["gateway_request_id"]) in counted:
            by_tenant.setdefault(row["tenant_id"], []).append(row["gateway_request_id"])
    ended: list[EndedHold] = []
    for tenant_id, ids in sorted(by_tenant.items()):
        ended += await _end_holds(connection, tenant_id, ids, now)
    return ended


async def _end_holds(
    connection: Connection, tenant_id: str, ids: list[str], now: datetime
) -> list[EndedHold]:
    """In one transaction: lock those of `ids` still open (skipping any a batch holds), end each
    `settled` when its event is counted, `expired` otherwise, and add what they held to their
    counters' `ended_usd`."""
    if not ids:
        return []
    async with connection.transaction():
        rows = await connection.fetch(_LOCK_ENDING, tenant_id, ids)
        if not rows:
            return []
        locked = [row["gateway_request_id"] for row in rows]
        charges: dict[str, Decimal] = {
            found["gateway_request_id"]: found["customer_charge_usd"]
            for found in await connection.fetch(_COUNTED_CHARGES, locked, tenant_id)
        }
        await connection.execute(
            _END_BY_SWEEPER,
            tenant_id,
            locked,
            [charges.get(request_id) for request_id in locked],
            now,
            [request_id in charges for request_id in locked],
        )
        await _add_ended(connection, rows)
    return [
        _ended(
            row,
            SETTLED_LATE if row["gateway_request_id"] in charges else EXPIRED,
            charges.get(row["gateway_request_id"]),
        )
        for row in rows
    ]


_HELD_BY_COUNTER = """
    SELECT tenant_id, scope_type, scope_id, "window", period_start,
           placed_usd - ended_usd AS held_usd
    FROM budget_held WHERE tenant_id = $1
"""


async def held_by_counter(connection: Connection, tenant_id: str) -> dict[SpendKey, Decimal]:
    """What each of the tenant's counters holds now: placed - ended."""
    return {
        (
            row["tenant_id"],
            row["scope_type"],
            row["scope_id"],
            row["window"],
            row["period_start"],
        ): row["held_usd"]
        for row in await connection.fetch(_HELD_BY_COUNTER, tenant_id)
    }
