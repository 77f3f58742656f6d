"""Corrections' surface tests (API and CLI): stored events, and the rows the consumers leave once
they apply a correction, written here directly (the consumers' side is tested on its own)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import asyncpg

from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.domain.corrections import Effective, original
from tests import clock
from tests.integration.pipeline import encode, usage_event
from tests.records import consumer_record


async def store_event(pool: asyncpg.Pool, tenant: str, **fields: Any) -> asyncpg.Record:
    """One usage event stored by the usage consumer's own recorder; its row."""
    event = usage_event(tenant, **fields)
    record = consumer_record(encode(event), offset=0, key=tenant.encode())
    await UsageRecorder(pool=pool, clock=clock.now).record_batch([record])
    row = await pool.fetchrow(
        "SELECT * FROM llm_usage_events WHERE tenant_id = $1 AND gateway_request_id = $2",
        tenant,
        event["gateway_request_id"],
    )
    assert row is not None
    return row


class _Figures:
    """A stored row read through attributes, as `original` reads a stored event."""

    def __init__(self, row: asyncpg.Record) -> None:
        self._row = row

    def __getattr__(self, name: str) -> Any:
        return self._row[name]


def as_stored(event: asyncpg.Record) -> Effective:
    """What a stored event contributes before any correction."""
    return original(_Figures(event))


def utc_text(moment: datetime) -> str:
    """As the API writes a time: RFC 3339 in UTC with `Z`."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def set_effective(
    pool: asyncpg.Pool, event: asyncpg.Record, effective: Effective, *, winner: str
) -> None:
    """The event's effective row, as the usage consumer writes it when a correction wins."""
    values = asdict(effective)
    await pool.execute(
        f"""
        INSERT INTO usage_event_effective (tenant_id, occurred_at, gateway_request_id,
            winner_occurred_at, winner_id, corrections, {", ".join(values)})
        VALUES ($1, $2, $3, $4, $5, 1, {", ".join(f"${n}" for n in range(6, 6 + len(values)))})
        """,
        event["tenant_id"],
        event["occurred_at"],
        event["gateway_request_id"],
        clock.now(),
        winner,
        *values.values(),
    )


async def add_correction(
    pool: asyncpg.Pool,
    event: asyncpg.Record,
    correction_id: str,
    *,
    action: str,
    occurred_at: datetime,
    fields: dict[str, Any] | None = None,
    verdict: str = "applied",
    won: bool = True,
) -> None:
    """A row of the event's history, as the usage consumer records a correction it judged."""
    await pool.execute(
        """
        INSERT INTO usage_corrections (tenant_id, correction_id, gateway_request_id, action,
            fields, reason, actor, occurred_at, event_occurred_at, received_at, verdict, won)
        VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12)
        """,
        event["tenant_id"],
        correction_id,
        event["gateway_request_id"],
        action,
        json.dumps(fields or {}),
        f"reason of {correction_id}",
        "ops@example.com",
        occurred_at,
        event["occurred_at"] if verdict == "applied" else None,
        clock.now(),
        verdict,
        won,
    )


async def park_correction(
    pool: asyncpg.Pool, tenant: str, gateway_request_id: str, correction_id: str
) -> None:
    """A correction the usage consumer parked to wait for its event."""
    await pool.execute(
        """
        INSERT INTO correction_waits (consumer, tenant_id, correction_id, gateway_request_id,
            record_topic, record_partition, record_offset, record_key, record_value,
            first_seen_at, wait_until)
        VALUES ('usage', $1, $2, $3, 'usage', 0, 0, $4, '{}', $5::timestamptz,
            $5::timestamptz + interval '15 minutes')
        """,
        tenant,
        correction_id,
        gateway_request_id,
        tenant.encode(),
        clock.now(),
    )
