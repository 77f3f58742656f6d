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

_FIELDS = ", ".join(CONFLICT_FIELDS)
# One round trip per chunk: the window's rows for the ids, and the rows stored under the Tier 1
# keys the chunk names (each key probes its own month's partition).
_LOOK_UP = f"""
    SELECT true AS in_window, gateway_request_id, {_FIELDS}
    FROM usage_event_ids WHERE gateway_request_id = ANY($1::text[])
    UNION ALL
    SELECT false, e.gateway_request_id, {", ".join(f"e.{f}" for f in CONFLICT_FIELDS)}
    FROM unnest($2::text[], $3::timestamptz[], $4::text[]) AS k(tenant_id, occurred_at, id)
    JOIN llm_usage_events AS e ON e.tenant_id = k.tenant_id
        AND e.occurred_at = k.occurred_at AND e.gateway_request_id = k.id
"""
_INSERT_NEW_IDS = f"""
    INSERT INTO usage_event_ids ({", ".join(WINDOW_COLUMNS)})
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
        $6::bigint[], $7::bigint[], $8::bigint[], $9::numeric[], $10::timestamptz[])
        AS new_ids({", ".join(WINDOW_COLUMNS)})
    ORDER BY gateway_request_id COLLATE "C"
    ON CONFLICT (gateway_request_id) DO NOTHING
    RETURNING gateway_request_id
"""
_WINDOW_VALUES = operator.attrgetter(*WINDOW_COLUMNS)

Fields = Mapping[str, Any]
TierOneKey = tuple[str, Any, str]  # (tenant_id, occurred_at, gateway_request_id)


@dataclass
class KnownIdentities:
    """What the two tiers hold for a chunk's ids."""

    window: dict[str, Fields] = field(default_factory=dict)
    stored: dict[TierOneKey, Fields] = field(default_factory=dict)


async def look_up_identities(
    connection: Connection, ids: Sequence[str], keys: Sequence[TierOneKey]
) -> KnownIdentities:
    """The window's row of each id in `ids`, and the stored row of each Tier 1 key in `keys`."""
    known = KnownIdentities()
    if not ids:
        return known
    tenants, times, key_ids = (list(column) for column in zip(*keys, strict=True))
    for row in await connection.fetch(_LOOK_UP, list(ids), tenants, times, key_ids):
        fields = {name: row[name] for name in CONFLICT_FIELDS}
        if row["in_window"]:
            known.window[row["gateway_request_id"]] = fields
        else:
            key = (row["tenant_id"], row["occurred_at"], row["gateway_request_id"])
            known.stored[key] = fields
    return known


def _sorted_by_id(events: Sequence[UsageRow]) -> list[UsageRow]:
    # Code point order, as `COLLATE "C"` sorts: every writer takes the ids' locks in one order.
    return sorted(events, key=lambda event: event.gateway_request_id)


async def copy_new_ids(connection: Connection, events: Sequence[UsageRow]) -> None:
    """COPY the ids of `events`, known to be new, into the window: the fast path. If another
    transaction added one meanwhile, PostgreSQL raises `UniqueViolationError`."""
    if events:
        await connection.copy_records_to_table(
            "usage_event_ids",
            records=[_WINDOW_VALUES(event) for event in _sorted_by_id(events)],
            columns=list(WINDOW_COLUMNS),
        )


async def insert_new_ids(connection: Connection, events: Sequence[UsageRow]) -> set[str]:
    """Add the ids of `events` the window does not hold yet; return those added. An id another
    transaction is adding makes this wait for it, so an id not returned is committed there."""
    if not events:
        return set()
    columns = [list(values) for values in zip(*map(_WINDOW_VALUES, events), strict=True)]
    return {row[0] for row in await connection.fetch(_INSERT_NEW_IDS, *columns)}
