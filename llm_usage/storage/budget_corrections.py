"""The budget consumer's own records of corrections (design §6): which corrections it applied
to the counters (`budget_corrections`, its idempotency record) and what the id window holds of
an event: whether it is counted, and the attribution and charge it was counted with. The usage
consumer's verdicts, the events and the waits are read and written through
storage/corrections.py.

Every read takes the whole batch's keys at once: one round trip per kind per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Final

from llm_usage.storage.corrections import CorrectionKey, EventKey
from llm_usage.storage.pool import Connection

# The event's values a window row holds beside its id and tenant, as `WindowEvent` names them.
WINDOW_EVENT_FIELDS: Final = (
    "deployment_id",
    "user_id",
    "agent_id",
    "customer_charge_usd",
    "occurred_at",
)


@dataclass(frozen=True, slots=True)
class WindowEvent:
    """What the id window holds of an event: whether the budget consumer counted it and, when
    the row was written with its whole attribution (`attributed`), the copy's attribution,
    charge and time — all a correction's counter moves read of the event."""

    counted: bool
    attributed: bool
    deployment_id: str | None
    user_id: str | None
    agent_id: str | None
    customer_charge_usd: Decimal
    occurred_at: datetime


_APPLIED_TO_EVENTS = """
    SELECT tenant_id, correction_id
    FROM budget_corrections
    WHERE (tenant_id, gateway_request_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
# What the budget consumer reads of an event's window row: whether it is counted, and the copy's
# attribution, charge and time, when the row has them (`attributed`: migration 0017).
_WINDOW_FIELDS = ", ".join(
    f"w.{name}" for name in ("tenant_id", "counted", "attributed", *WINDOW_EVENT_FIELDS)
)
# The window's row of each id, one index probe each, pruned at run time to the id's hash slice
# (the single-node form): the join below makes the planner scan the whole window for a batch's
# ids (~13 ms a batch at 200k ids in bench budget).
_WINDOW_PROBED = f"""
    SELECT k.id, {_WINDOW_FIELDS}
    FROM unnest($1::text[]) AS k(id)
    JOIN LATERAL (
        SELECT * FROM usage_event_ids WHERE gateway_request_id = k.id LIMIT 1
    ) AS w ON true
"""
# The window's rows of the ids, by a join on its distribution column (the form Citus runs, as
# storage/corrections.py's look-up).
_WINDOW = f"""
    SELECT w.gateway_request_id AS id, {_WINDOW_FIELDS}
    FROM unnest($1::text[]) AS ids(id)
    JOIN usage_event_ids AS w ON w.gateway_request_id = ids.id
"""
_RECORD_APPLIED = """
    INSERT INTO budget_corrections (tenant_id, correction_id, gateway_request_id, applied_at)
    SELECT t, c, g, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS k(t, c, g)
    ORDER BY t COLLATE "C", c COLLATE "C"
    ON CONFLICT DO NOTHING
"""


async def applied_to_events(
    connection: Connection, events: Iterable[EventKey]
) -> set[CorrectionKey]:
    """Every correction of these events (tenant_id, gateway_request_id) this consumer applied
    to the counters."""
    keys = sorted(set(events))
    if not keys:
        return set()
    rows = await connection.fetch(_APPLIED_TO_EVENTS, [k[0] for k in keys], [k[1] for k in keys])
    return {(row["tenant_id"], row["correction_id"]) for row in rows}


async def window_events(
    connection: Connection, events: Iterable[EventKey], *, citus: bool = False
) -> dict[EventKey, WindowEvent]:
    """The id window's row of each event; an event with no window row of its tenant is absent
    (it is older than the window). `citus`: the database is a Citus coordinator."""
    wanted = set(events)
    rows = await connection.fetch(
        _WINDOW if citus else _WINDOW_PROBED, sorted({request_id for _, request_id in wanted})
    )
    return {
        (row["tenant_id"], row["id"]): WindowEvent(
            row["counted"], row["attributed"], *(row[name] for name in WINDOW_EVENT_FIELDS)
        )
        for row in rows
        if (row["tenant_id"], row["id"]) in wanted
    }


async def record_applied(
    connection: Connection, applied: Sequence[tuple[str, str, str]], *, now: datetime
) -> None:
    """Remember each (tenant_id, correction_id, gateway_request_id) as applied to the counters."""
    if applied:
        columns = [[row[i] for row in applied] for i in range(3)]
        await connection.execute(_RECORD_APPLIED, *columns, now)
