"""One stored usage event with its corrections: what `GET /v1/usage-events/{id}` and
`llm-usage events show` answer, and what `events void|amend` start from.

An event is found by (tenant, gateway_request_id). There is no index on the id alone (0005: each
index on the events costs ingest), so the look-up goes from cheap to dear: the id window
(`usage_event_ids`) gives the event's `occurred_at`, and so its Tier 1 key; else a caller's hint
of `occurred_at` does; else the tenant's events are searched for the id (its slice of the Tier 1
index, every month: slow for a big tenant, and only needed past the window).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from llm_usage.domain.corrections import Effective, original
from llm_usage.storage.pool import Connection
from llm_usage.storage.usage_event_pages import (
    EFFECTIVE_COLUMNS,
    STORED_COLUMNS,
    StoredUsageEvent,
)

_STORED: Final = ", ".join(STORED_COLUMNS)

_IN_WINDOW: Final = (
    "SELECT tenant_id, occurred_at FROM usage_event_ids WHERE gateway_request_id = $1"
)
_BY_KEY: Final = (
    f"SELECT {_STORED} FROM llm_usage_events "
    "WHERE tenant_id = $1 AND occurred_at = $2 AND gateway_request_id = $3"
)
# Past the window: the tenant's slice of the Tier 1 index, every month (the id is its third
# column). Were an id re-used past the window, its newest event is the one meant.
_BY_TENANT: Final = (
    f"SELECT {_STORED} FROM llm_usage_events "
    "WHERE tenant_id = $1 AND gateway_request_id = $2 ORDER BY occurred_at DESC LIMIT 1"
)
_EFFECTIVE: Final = (
    f"SELECT {', '.join(EFFECTIVE_COLUMNS)} FROM usage_event_effective "
    "WHERE tenant_id = $1 AND occurred_at = $2 AND gateway_request_id = $3"
)
# The event's corrections, oldest first by their own time (the order "last wins" reads). One
# judged before the event was found (verdict unknown) has no event time yet: it is this id's too.
_HISTORY: Final = """
    SELECT correction_id, action, fields::text AS fields, reason, actor, occurred_at,
           received_at, verdict, won
    FROM usage_corrections
    WHERE tenant_id = $1 AND gateway_request_id = $2
      AND (event_occurred_at IS NULL OR event_occurred_at = $3)
    ORDER BY occurred_at, correction_id COLLATE "C"
"""
_WAITING: Final = (
    "SELECT EXISTS (SELECT FROM correction_waits WHERE tenant_id = $1 AND gateway_request_id = $2)"
)


@dataclass(frozen=True, slots=True)
class CorrectionEntry:
    """One correction of an event, as the usage consumer judged it."""

    correction_id: str
    action: str
    fields: dict[str, Any]  # as sent: money as exact decimal strings
    reason: str
    actor: str
    occurred_at: datetime
    received_at: datetime
    verdict: str
    won: bool


@dataclass(frozen=True, slots=True)
class EventHistory:
    """A stored event, what it contributes now, and every correction of it."""

    event: StoredUsageEvent
    effective: Effective
    corrections: list[CorrectionEntry]
    waiting: bool  # a correction of it is parked, not yet applied

    @property
    def voided(self) -> bool:
        return self.effective.voided


async def window_tenant(connection: Connection, gateway_request_id: str) -> str | None:
    """The tenant of the id in the id window (ids there are unique across tenants), or None."""
    row = await connection.fetchrow(_IN_WINDOW, gateway_request_id)
    return None if row is None else str(row["tenant_id"])


async def find_event(
    connection: Connection,
    tenant_id: str,
    gateway_request_id: str,
    *,
    occurred_at: datetime | None = None,
) -> StoredUsageEvent | None:
    """The tenant's stored event of that id (`occurred_at`: a hint of its time), or None."""
    window = await connection.fetchrow(_IN_WINDOW, gateway_request_id)
    hints = [occurred_at] if occurred_at is not None else []
    if window is not None and window["tenant_id"] == tenant_id:
        hints.insert(0, window["occurred_at"])
    for moment in dict.fromkeys(hints):
        row = await connection.fetchrow(_BY_KEY, tenant_id, moment, gateway_request_id)
        if row is not None:
            return StoredUsageEvent(**dict(row))
    row = await connection.fetchrow(_BY_TENANT, tenant_id, gateway_request_id)
    return None if row is None else StoredUsageEvent(**dict(row))


async def correction_waiting(
    connection: Connection, tenant_id: str, gateway_request_id: str
) -> bool:
    """Whether a correction of that id is parked, waiting for its event or its verdict."""
    return bool(await connection.fetchval(_WAITING, tenant_id, gateway_request_id))


async def effective_values(connection: Connection, event: StoredUsageEvent) -> Effective:
    """What the event contributes now: its corrected values, or its own when never corrected."""
    row = await connection.fetchrow(
        _EFFECTIVE, event.tenant_id, event.occurred_at, event.gateway_request_id
    )
    return original(event) if row is None else Effective(**dict(row))


async def event_history(connection: Connection, event: StoredUsageEvent) -> EventHistory:
    """The event with its effective values, its corrections and whether one is waiting."""
    rows = await connection.fetch(
        _HISTORY, event.tenant_id, event.gateway_request_id, event.occurred_at
    )
    corrections = [
        CorrectionEntry(**{**dict(row), "fields": json.loads(row["fields"])}) for row in rows
    ]
    return EventHistory(
        event=event,
        effective=await effective_values(connection, event),
        corrections=corrections,
        waiting=await correction_waiting(connection, event.tenant_id, event.gateway_request_id),
    )
