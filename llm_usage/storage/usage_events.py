"""Writing usage events to `llm_usage_events`: one statement per batch, duplicates untouched."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.pool import Connection

# Column name → PostgreSQL type, in table order (`UsageRow`'s); `received_at` is filled in by
# the database.
USAGE_EVENT_COLUMNS: Mapping[str, str] = {
    "gateway_request_id": "text",
    "tenant_id": "text",
    "deployment_id": "text",
    "user_id": "text",
    "agent_id": "text",
    "channel": "text",
    "feature": "text",
    "provider": "text",
    "model": "text",
    "request_kind": "text",
    "input_tokens": "bigint",
    "output_tokens": "bigint",
    "cached_input_tokens": "bigint",
    "reasoning_tokens": "bigint",
    "total_tokens": "bigint",
    "upstream_cost_usd": "numeric",
    "customer_charge_usd": "numeric",
    "customer_charge_cents": "bigint",
    "markup_mode": "text",
    "occurred_at": "timestamptz",
    "charge_estimated": "boolean",
    "price_effective_from": "timestamptz",
}

_COLUMN_LIST = ", ".join(USAGE_EVENT_COLUMNS)
_UNNEST_ARGS = ", ".join(
    f"${position}::{pg_type}[]" for position, pg_type in enumerate(USAGE_EVENT_COLUMNS.values(), 1)
)
# One round trip for the whole batch: arrays in, the ids that were new out.
_INSERT_NEW = f"""
    INSERT INTO llm_usage_events ({_COLUMN_LIST})
    SELECT * FROM unnest({_UNNEST_ARGS})
    ON CONFLICT (tenant_id, occurred_at, gateway_request_id) DO NOTHING
    RETURNING gateway_request_id
"""


async def copy_usage_events(connection: Connection, events: Sequence[UsageRow]) -> None:
    """COPY `events` straight into the table: the fastest path, for ids known to be new.

    All or nothing: if another transaction stored one of these keys meanwhile, PostgreSQL raises
    `UniqueViolationError` and none of the rows is kept.
    """
    if events:
        await connection.copy_records_to_table(
            "llm_usage_events",
            records=events,
            columns=list(USAGE_EVENT_COLUMNS),
        )


async def insert_new_usage_events(connection: Connection, events: Sequence[UsageRow]) -> set[str]:
    """Insert the events not stored yet under their Tier 1 key; return the ids inserted.

    Ids must be unique within `events`. A stored row is never touched. When another transaction
    is inserting the same key, PostgreSQL waits for it, so a key not returned here is committed.
    """
    if not events:
        return set()
    columns = [list(values) for values in zip(*events, strict=True)]
    rows = await connection.fetch(_INSERT_NEW, *columns)
    return {row["gateway_request_id"] for row in rows}


async def usage_table_exists(connection: Connection) -> bool:
    """True when the migrations that create `llm_usage_events` have run."""
    found = await connection.fetchval("SELECT to_regclass('llm_usage_events') IS NOT NULL")
    return bool(found)
