"""The budget consumer's reads and writes for corrections (design §6): the usage consumer's
verdicts, what this consumer applied already, the corrected events' window rows and originals,
its idempotency records and its parked corrections.

Every read takes the whole batch's keys at once: one round trip per kind per batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from llm_usage.domain.corrections import Action, Correction
from llm_usage.storage.pool import Connection

BUDGET = "budget"  # correction_waits.consumer

# The correction buckets (design §5.1.1), the same locks as the usage consumer's: at most 256 a
# transaction, taken first and in ascending order (design §7).
CORRECTION_LOCK_CLASS = 0x6C6C6D43  # "llmC"
_LOCK_BUCKETS = """
    SELECT pg_advisory_xact_lock($1, b)
    FROM (SELECT DISTINCT hashtext(t || '/' || g) & 255 AS b
          FROM unnest($2::text[], $3::text[]) AS k(t, g)) AS buckets
    ORDER BY b
"""

_CORRECTION_COLUMNS = (
    "tenant_id, correction_id, gateway_request_id, action, fields, reason, actor, occurred_at, "
    "event_occurred_at"
)
_VERDICTS = f"""
    SELECT {_CORRECTION_COLUMNS}, verdict FROM usage_corrections
    WHERE (tenant_id, correction_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
_APPLIED_HERE = """
    SELECT tenant_id, correction_id FROM budget_corrections
    WHERE (tenant_id, correction_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
# The usage consumer's rows of the corrections this consumer applied to these events.
_APPLIED_HISTORY = f"""
    SELECT {", ".join(f"u.{c}" for c in _CORRECTION_COLUMNS.split(", "))}
    FROM usage_corrections AS u
    JOIN budget_corrections AS b USING (tenant_id, correction_id)
    WHERE (u.tenant_id, u.gateway_request_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
# One probe of the window per id (pruned at run time to the id's slice, as storage/event_ids.py).
_WINDOW = """
    SELECT k.id, w.tenant_id, w.counted
    FROM unnest($1::text[]) AS k(id)
    JOIN LATERAL (
        SELECT tenant_id, counted FROM usage_event_ids WHERE gateway_request_id = k.id LIMIT 1
    ) AS w ON true
"""
# One probe of the Tier 1 key per event (pruned at run time to the key's month).
_ORIGINALS = """
    SELECT e.*
    FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS k(tenant_id, occurred_at, id)
    JOIN LATERAL (
        SELECT * FROM llm_usage_events
        WHERE tenant_id = k.tenant_id AND occurred_at = k.occurred_at
          AND gateway_request_id = k.id
        LIMIT 1
    ) AS e ON true
"""
_RECORD_APPLIED = """
    INSERT INTO budget_corrections (tenant_id, correction_id, gateway_request_id, applied_at)
    SELECT t, c, g, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS k(t, c, g)
    ORDER BY t COLLATE "C", c COLLATE "C"
    ON CONFLICT DO NOTHING
"""
_PARK = f"""
    INSERT INTO correction_waits (consumer, tenant_id, correction_id, gateway_request_id,
        record_topic, record_partition, record_offset, record_key, record_value,
        first_seen_at, wait_until)
    SELECT '{BUDGET}', t, c, g, rt, rp, ro, rk, rv, $10, $11
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::bigint[],
                $7::bytea[], $8::bytea[], $9::int[]) AS k(t, c, g, rt, rp, ro, rk, rv, n)
    ORDER BY n
    ON CONFLICT DO NOTHING
"""
_UNPARK = f"""
    DELETE FROM correction_waits
    WHERE consumer = '{BUDGET}'
      AND (tenant_id, correction_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
_STILL_WAITING = f"""
    UPDATE correction_waits SET tries = tries + 1
    WHERE consumer = '{BUDGET}'
      AND (tenant_id, correction_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
_WAITING_TENANTS = f"""
    SELECT DISTINCT tenant_id FROM correction_waits WHERE consumer = '{BUDGET}' LIMIT $1
"""
_WAITING_OF_TENANT = f"""
    SELECT correction_id, gateway_request_id FROM correction_waits
    WHERE consumer = '{BUDGET}' AND tenant_id = $1
"""
_TAKE_WAITING = f"""
    SELECT tenant_id, correction_id, gateway_request_id, record_topic, record_partition,
        record_offset, record_key, record_value
    FROM correction_waits
    WHERE consumer = '{BUDGET}' AND tenant_id = $1 AND correction_id = ANY($2::text[])
    ORDER BY first_seen_at, record_partition, record_offset
    FOR UPDATE SKIP LOCKED
"""
_WAIT_FIGURES = f"""
    SELECT count(*) AS waiting, min(first_seen_at) AS oldest
    FROM correction_waits WHERE consumer = '{BUDGET}'
"""

CorrectionKey = tuple[str, str]  # (tenant_id, correction_id)
EventKey = tuple[str, str]  # (tenant_id, gateway_request_id)


def _columns(keys: Iterable[tuple[Any, ...]], width: int) -> list[list[Any]]:
    rows = list(keys)
    return [[row[i] for row in rows] for i in range(width)]


def stored_correction(row: Mapping[str, Any]) -> Correction:
    """A `usage_corrections` row as the correction it stores (money back to exact decimals)."""
    fields = json.loads(row["fields"])
    if "customer_charge_usd" in fields:
        fields["customer_charge_usd"] = Decimal(fields["customer_charge_usd"])
    return Correction(
        tenant_id=row["tenant_id"],
        correction_id=row["correction_id"],
        gateway_request_id=row["gateway_request_id"],
        action=Action(row["action"]),
        fields=fields,
        reason=row["reason"],
        actor=row["actor"],
        occurred_at=row["occurred_at"],
        event_occurred_at=row["event_occurred_at"],
    )


async def lock_correction_buckets(connection: Connection, events: Iterable[EventKey]) -> None:
    """Take the correction buckets of these events (tenant_id, gateway_request_id) for the rest
    of the transaction, in ascending order."""
    tenants, ids = _columns(set(events), 2)
    if tenants:
        await connection.execute(_LOCK_BUCKETS, CORRECTION_LOCK_CLASS, tenants, ids)


async def usage_verdicts(
    connection: Connection, keys: Iterable[CorrectionKey]
) -> dict[CorrectionKey, Any]:
    """The usage consumer's rows (`usage_corrections`) of these corrections, by key; a key it
    has not judged yet is absent."""
    rows = await connection.fetch(_VERDICTS, *_columns(set(keys), 2))
    return {(row["tenant_id"], row["correction_id"]): row for row in rows}


async def applied_here(connection: Connection, keys: Iterable[CorrectionKey]) -> set[CorrectionKey]:
    """Which of these corrections this consumer applied already (`budget_corrections`)."""
    rows = await connection.fetch(_APPLIED_HERE, *_columns(set(keys), 2))
    return {(row["tenant_id"], row["correction_id"]) for row in rows}


async def applied_history(connection: Connection, events: Iterable[EventKey]) -> list[Any]:
    """The `usage_corrections` rows of every correction this consumer applied to these events."""
    return list(await connection.fetch(_APPLIED_HISTORY, *_columns(set(events), 2)))


async def window_counted(
    connection: Connection, events: Iterable[EventKey]
) -> dict[EventKey, bool]:
    """Whether each event's id window row says counted; an event whose tenant has no window row
    for the id is absent (it is older than the window)."""
    wanted = set(events)
    rows = await connection.fetch(_WINDOW, sorted({request_id for _, request_id in wanted}))
    found: dict[EventKey, bool] = {}
    for row in rows:
        key = (row["tenant_id"], row["id"])
        if key in wanted:
            found[key] = row["counted"]
    return found


async def stored_originals(
    connection: Connection, keys: Iterable[tuple[str, datetime, str]]
) -> dict[EventKey, Any]:
    """The stored rows of these Tier 1 keys (tenant_id, occurred_at, gateway_request_id), by
    (tenant_id, gateway_request_id)."""
    rows = await connection.fetch(_ORIGINALS, *_columns(set(keys), 3))
    return {(row["tenant_id"], row["gateway_request_id"]): row for row in rows}


async def record_applied(
    connection: Connection, applied: Sequence[tuple[str, str, str]], *, now: datetime
) -> None:
    """Remember (tenant_id, correction_id, gateway_request_id) as applied to the counters."""
    if applied:
        await connection.execute(_RECORD_APPLIED, *_columns(applied, 3), now)


@dataclass(frozen=True)
class Parked:
    """A correction waiting, with its record byte for byte (the side task decodes it again)."""

    tenant_id: str
    correction_id: str
    gateway_request_id: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


async def park(
    connection: Connection, waiting: Sequence[Parked], *, now: datetime, wait_seconds: float
) -> None:
    """Park corrections to wait for the usage consumer's verdict or their event's count; a
    correction parked already keeps its first row."""
    if not waiting:
        return
    await connection.execute(
        _PARK,
        [w.tenant_id for w in waiting],
        [w.correction_id for w in waiting],
        [w.gateway_request_id for w in waiting],
        [w.topic for w in waiting],
        [w.partition for w in waiting],
        [w.offset for w in waiting],
        [w.key for w in waiting],
        [w.value for w in waiting],
        list(range(len(waiting))),
        now,
        now + timedelta(seconds=wait_seconds),
    )


async def unpark(connection: Connection, keys: Iterable[CorrectionKey]) -> None:
    """Forget the parked rows of these corrections (resolved)."""
    tenants, ids = _columns(set(keys), 2)
    if tenants:
        await connection.execute(_UNPARK, tenants, ids)


async def still_waiting(connection: Connection, keys: Iterable[CorrectionKey]) -> None:
    """Count one more try for parked corrections that still wait."""
    tenants, ids = _columns(set(keys), 2)
    if tenants:
        await connection.execute(_STILL_WAITING, tenants, ids)


async def waiting_tenants(connection: Connection, *, limit: int = 1000) -> list[str]:
    """Tenants with corrections parked by this consumer."""
    return [row[0] for row in await connection.fetch(_WAITING_TENANTS, limit)]


async def waiting_of_tenant(connection: Connection, tenant_id: str) -> list[tuple[str, str]]:
    """(correction_id, gateway_request_id) of every correction the tenant has parked."""
    rows = await connection.fetch(_WAITING_OF_TENANT, tenant_id)
    return [(row["correction_id"], row["gateway_request_id"]) for row in rows]


async def take_waiting(
    connection: Connection, tenant_id: str, correction_ids: Sequence[str]
) -> list[Parked]:
    """Lock the tenant's parked rows of these ids that no other replica holds, in the order
    they were first seen."""
    rows = await connection.fetch(_TAKE_WAITING, tenant_id, list(correction_ids))
    return [Parked(*row) for row in rows]


async def wait_figures(connection: Connection) -> tuple[int, datetime | None]:
    """How many corrections this consumer has parked, and when the oldest was first seen."""
    row = await connection.fetchrow(_WAIT_FIGURES)
    assert row is not None  # an aggregate without GROUP BY has one row
    return row["waiting"], row["oldest"]
