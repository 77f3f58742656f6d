"""The alert outbox: alerts decided in the database's transaction, published by the relay.

The unique alert key makes an insert of an alert that exists a no-op, so "at most once, ever"
is the database's to enforce. `NOTIFY budget_alerts` in the inserting transaction wakes the
relay the moment the alert is committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from llm_usage.schemas.budget_alert import BudgetAlert
from llm_usage.storage.pool import Connection

ALERTS_CHANNEL = "budget_alerts"

_INSERT = """
    INSERT INTO budget_alert_outbox
        (alert_id, tenant_id, scope_type, scope_id, "window", period_start, level, limit_usd,
         payload)
    SELECT a, t, st, si, w, ps, l, lim, p
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::date[],
                $7::text[], $8::numeric[], $9::text[])
        WITH ORDINALITY AS u(a, t, st, si, w, ps, l, lim, p, n)
    ORDER BY n
    ON CONFLICT DO NOTHING
    RETURNING alert_id
"""


@dataclass(frozen=True)
class PendingAlert:
    seq: int
    alert_id: str
    tenant_id: str
    level: str
    payload: bytes
    created_at: datetime


async def insert_alerts(connection: Connection, alerts: Sequence[BudgetAlert]) -> list[str]:
    """Add alerts whose key has never alerted, in order (warning before exceeded); return the
    ids added. The relay hears of them when the transaction commits."""
    if not alerts:
        return []
    rows = await connection.fetch(
        _INSERT,
        [a.alert_id for a in alerts],
        [a.tenant_id for a in alerts],
        [a.scope_type.value for a in alerts],
        [a.scope_id for a in alerts],
        [a.window.value for a in alerts],
        [a.period_start for a in alerts],
        [a.level.value for a in alerts],
        [a.limit_usd for a in alerts],
        [a.encode().decode() for a in alerts],
    )
    added = [row["alert_id"] for row in rows]
    if added:
        await connection.execute("SELECT pg_notify($1, '')", ALERTS_CHANNEL)
    return added


async def known_alert_ids(connection: Connection, alert_ids: Sequence[str]) -> set[str]:
    """Which of these alerts have been decided already."""
    if not alert_ids:
        return set()
    rows = await connection.fetch(
        "SELECT alert_id FROM budget_alert_outbox WHERE alert_id = ANY($1::text[])",
        list(alert_ids),
    )
    return {row["alert_id"] for row in rows}


async def pending_alerts(connection: Connection, *, limit: int) -> list[PendingAlert]:
    """The oldest alerts not yet published, in the order they were decided."""
    rows = await connection.fetch(
        "SELECT seq, alert_id, tenant_id, level, payload, created_at FROM budget_alert_outbox "
        "WHERE published_at IS NULL ORDER BY seq LIMIT $1",
        limit,
    )
    return [
        PendingAlert(
            seq=row["seq"],
            alert_id=row["alert_id"],
            tenant_id=row["tenant_id"],
            level=row["level"],
            payload=row["payload"].encode(),
            created_at=row["created_at"],
        )
        for row in rows
    ]


async def mark_published(
    connection: Connection,
    alert_ids: Sequence[str],
    *,
    topic: str,
    next_offsets: Mapping[int, int],
) -> None:
    """Mark alerts as on the topic, and remember where the topic's partitions ended after them
    (a relay that takes over reads the topic from there)."""
    async with connection.transaction():
        await connection.execute(
            "UPDATE budget_alert_outbox SET published_at = now() "
            "WHERE alert_id = ANY($1::text[]) AND published_at IS NULL",
            list(alert_ids),
        )
        if next_offsets:
            partitions = sorted(next_offsets)
            await connection.execute(
                "INSERT INTO budget_alert_relay_positions (topic, partition, next_offset) "
                "SELECT $1, p, o FROM unnest($2::int[], $3::bigint[]) AS u(p, o) "
                "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = "
                "greatest(budget_alert_relay_positions.next_offset, EXCLUDED.next_offset)",
                topic,
                partitions,
                [next_offsets[p] for p in partitions],
            )


async def relay_positions(connection: Connection, topic: str) -> dict[int, int]:
    rows = await connection.fetch(
        "SELECT partition, next_offset FROM budget_alert_relay_positions WHERE topic = $1", topic
    )
    return {row["partition"]: row["next_offset"] for row in rows}


async def outbox_backlog(connection: Connection) -> tuple[int, datetime | None]:
    """How many alerts wait to be published, and when the oldest of them was decided."""
    row = await connection.fetchrow(
        "SELECT count(*) AS n, min(created_at) AS oldest FROM budget_alert_outbox "
        "WHERE published_at IS NULL"
    )
    assert row is not None
    return int(row["n"]), row["oldest"]
