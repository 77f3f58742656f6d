"""The two tiers of a usage event's identity, as stored: the id window and the Tier 1 key.

`usage_event_ids` holds every id seen within the window with its conflict fields; the usage
consumer adds the ids it stores, the budget consumer the ids it counts (storage/budget_spend.py).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_usage.schemas.usage_event import CONFLICT_FIELDS, UsageRow
from llm_usage.storage.pool import Connection

WINDOW_COLUMNS = ("gateway_request_id", *CONFLICT_FIELDS)
# What a writer of the window stores: the conflict fields, and the rest of the attribution
# (marked `attributed`: rows written before migration 0017 lack it).
WRITTEN_COLUMNS = (*WINDOW_COLUMNS, "user_id", "agent_id", "attributed")

_FIELDS = ", ".join(CONFLICT_FIELDS)
# One round trip per chunk, one probe per key and tier: for each (id, tenant, time) the chunk
# names, the window's row for the id and the row stored under that Tier 1 key. LATERAL with
# LIMIT 1 keeps each a probe of one index, pruned at run time to the id's hash slice and the
# key's month: the planner would otherwise scan every partition for a whole chunk's array.
_LOOK_UP = f"""
    SELECT k.id,
        {", ".join(f"w.{f} AS w_{f}" for f in CONFLICT_FIELDS)},
        {", ".join(f"e.{f} AS e_{f}" for f in CONFLICT_FIELDS)}
    FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS k(id, tenant_id, occurred_at)
    LEFT JOIN LATERAL (
        SELECT {_FIELDS} FROM usage_event_ids WHERE gateway_request_id = k.id LIMIT 1
    ) AS w ON true
    LEFT JOIN LATERAL (
        SELECT {_FIELDS} FROM llm_usage_events
        WHERE tenant_id = k.tenant_id AND occurred_at = k.occurred_at
          AND gateway_request_id = k.id
        LIMIT 1
    ) AS e ON true
    WHERE w.tenant_id IS NOT NULL OR e.tenant_id IS NOT NULL
"""
# The fast path's first probe: the window alone. The Tier 1 probe costs more than the window's
# (run-time pruning among the months, three keys to send): it is made only for the ids the window
# knows, where it can change the verdict.
_LOOK_UP_WINDOW = f"""
    SELECT k.id, {", ".join(f"w.{f} AS w_{f}" for f in CONFLICT_FIELDS)}
    FROM unnest($1::text[]) AS k(id)
    JOIN LATERAL (
        SELECT {_FIELDS} FROM usage_event_ids WHERE gateway_request_id = k.id LIMIT 1
    ) AS w ON true
"""
_LOOK_UP_STORED = f"""
    SELECT k.id, {", ".join(f"e.{f} AS e_{f}" for f in CONFLICT_FIELDS)}
    FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS k(id, tenant_id, occurred_at)
    JOIN LATERAL (
        SELECT {_FIELDS} FROM llm_usage_events
        WHERE tenant_id = k.tenant_id AND occurred_at = k.occurred_at
          AND gateway_request_id = k.id
        LIMIT 1
    ) AS e ON true
"""
# The same look-up in the form Citus accepts (storage/flavour.py says when): it refuses a
# LATERAL subquery on a distributed table ("complex joins are only supported when all
# distributed tables are co-located and joined on their distribution columns"). Each tier is read
# in a CTE of its own, then joined to the keys: the window by a join of the ids on its
# distribution column (for 5,000 ids, ~4x faster there than `= ANY`, which every shard of every
# hash slice parses whole), the events by `= ANY` of the chunk's arrays (faster than a join
# there). Several times slower on one node, hence not the default.
_LOOK_UP_CITUS = f"""
    WITH k AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
            AS k(id, tenant_id, occurred_at)
    ), w AS (
        SELECT i.gateway_request_id AS id, {", ".join(f"i.{f}" for f in CONFLICT_FIELDS)}
        FROM unnest($1::text[]) AS ids(id)
        JOIN usage_event_ids AS i ON i.gateway_request_id = ids.id
    ), e AS (
        SELECT gateway_request_id AS id, {_FIELDS} FROM llm_usage_events
        WHERE gateway_request_id = ANY($1::text[]) AND tenant_id = ANY($2::text[])
          AND occurred_at = ANY($3::timestamptz[])
    )
    SELECT k.id,
        {", ".join(f"w.{f} AS w_{f}" for f in CONFLICT_FIELDS)},
        {", ".join(f"e.{f} AS e_{f}" for f in CONFLICT_FIELDS)}
    FROM k
    LEFT JOIN w ON w.id = k.id
    LEFT JOIN e ON e.id = k.id AND e.tenant_id = k.tenant_id AND e.occurred_at = k.occurred_at
    WHERE w.tenant_id IS NOT NULL OR e.tenant_id IS NOT NULL
"""
# The fast path's two probes in the forms Citus accepts: the window by a join of the ids on its
# distribution column, the events in a CTE by `= ANY` of the keys, joined back to the keys.
_LOOK_UP_WINDOW_CITUS = f"""
    SELECT i.gateway_request_id AS id, {", ".join(f"i.{f} AS w_{f}" for f in CONFLICT_FIELDS)}
    FROM unnest($1::text[]) AS ids(id)
    JOIN usage_event_ids AS i ON i.gateway_request_id = ids.id
"""
_LOOK_UP_STORED_CITUS = f"""
    WITH k AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
            AS k(id, tenant_id, occurred_at)
    ), e AS (
        SELECT gateway_request_id AS id, {_FIELDS} FROM llm_usage_events
        WHERE gateway_request_id = ANY($1::text[]) AND tenant_id = ANY($2::text[])
          AND occurred_at = ANY($3::timestamptz[])
    )
    SELECT k.id, {", ".join(f"e.{f} AS e_{f}" for f in CONFLICT_FIELDS)}
    FROM k JOIN e ON e.id = k.id AND e.tenant_id = k.tenant_id AND e.occurred_at = k.occurred_at
"""
_WINDOW_NAMES = [f"w_{f}" for f in CONFLICT_FIELDS]
_STORED_NAMES = [f"e_{f}" for f in CONFLICT_FIELDS]
_INSERT_NEW_IDS = f"""
    INSERT INTO usage_event_ids ({", ".join(WRITTEN_COLUMNS)})
    SELECT *, true FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
        $6::bigint[], $7::bigint[], $8::bigint[], $9::numeric[], $10::timestamptz[], $11::text[],
        $12::text[]) AS new_ids({", ".join(WRITTEN_COLUMNS[:-1])})
    ORDER BY gateway_request_id COLLATE "C"
    ON CONFLICT (gateway_request_id) DO NOTHING
    RETURNING gateway_request_id
"""
_WINDOW_VALUES = operator.attrgetter(*WRITTEN_COLUMNS[:-1])

Fields = Mapping[str, Any]
TierOneKey = tuple[str, Any, str]  # (tenant_id, occurred_at, gateway_request_id)


@dataclass
class KnownIdentities:
    """What the two tiers hold for a chunk's ids."""

    window: dict[str, Fields] = field(default_factory=dict)
    stored: dict[TierOneKey, Fields] = field(default_factory=dict)


async def look_up_identities(
    connection: Connection, keys: Sequence[TierOneKey], *, citus: bool = False
) -> KnownIdentities:
    """For each Tier 1 key (tenant_id, occurred_at, gateway_request_id): the window's row of its
    id, and the row stored under the key. `citus`: the database is a Citus coordinator."""
    known = KnownIdentities()
    if not keys:
        return known
    tenants, times, ids = (list(column) for column in zip(*keys, strict=True))
    for row in await connection.fetch(_LOOK_UP_CITUS if citus else _LOOK_UP, ids, tenants, times):
        if row["w_tenant_id"] is not None:
            known.window[row["id"]] = dict(
                zip(CONFLICT_FIELDS, map(row.get, _WINDOW_NAMES), strict=True)
            )
        if row["e_tenant_id"] is not None:
            key = (row["e_tenant_id"], row["e_occurred_at"], row["id"])
            known.stored[key] = dict(zip(CONFLICT_FIELDS, map(row.get, _STORED_NAMES), strict=True))
    return known


async def look_up_window_first(
    connection: Connection, keys: Sequence[TierOneKey], *, citus: bool = False
) -> KnownIdentities:
    """What the window holds for the keys' ids, and what is stored under the keys of the ids it
    holds; two round trips, the second only when the window knows one of the ids.

    Not what is stored under a key whose id the window lacks: only an event older than the
    window can be, and storing a copy of it anyway fails on the Tier 1 key, so a caller that
    stores from this answer must be ready for a `UniqueViolationError` (the COPY fast path is).
    `citus`: the database is a Citus coordinator.
    """
    known = KnownIdentities()
    if not keys:
        return known
    ids = list(dict.fromkeys(key[2] for key in keys))
    for row in await connection.fetch(_LOOK_UP_WINDOW_CITUS if citus else _LOOK_UP_WINDOW, ids):
        known.window[row["id"]] = dict(
            zip(CONFLICT_FIELDS, map(row.get, _WINDOW_NAMES), strict=True)
        )
    met = [key for key in keys if key[2] in known.window]
    if met:
        tenants, times, met_ids = (list(column) for column in zip(*met, strict=True))
        stored = _LOOK_UP_STORED_CITUS if citus else _LOOK_UP_STORED
        for row in await connection.fetch(stored, met_ids, tenants, times):
            key = (row["e_tenant_id"], row["e_occurred_at"], row["id"])
            known.stored[key] = dict(zip(CONFLICT_FIELDS, map(row.get, _STORED_NAMES), strict=True))
    return known


async def copy_new_ids(connection: Connection, events: Sequence[UsageRow]) -> None:
    """COPY the ids of `events`, known to be new, into the window: the fast path. If another
    transaction added one meanwhile, PostgreSQL raises `UniqueViolationError` (on Citus, an
    `InternalServerError` with the same message: storage/flavour.py)."""
    if events:
        await connection.copy_records_to_table(
            "usage_event_ids",
            records=((*_WINDOW_VALUES(event), True) for event in events),
            columns=list(WRITTEN_COLUMNS),
        )


async def insert_new_ids(connection: Connection, events: Sequence[UsageRow]) -> set[str]:
    """Add the ids of `events` the window does not hold yet; return those added. An id another
    transaction is adding makes this wait for it, so an id not returned is committed there."""
    if not events:
        return set()
    columns = [list(values) for values in zip(*map(_WINDOW_VALUES, events), strict=True)]
    return {row[0] for row in await connection.fetch(_INSERT_NEW_IDS, *columns)}
