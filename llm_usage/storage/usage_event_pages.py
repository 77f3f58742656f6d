"""A tenant's stored usage events, newest first, one keyset page at a time.

Pages are ordered by (occurred_at DESC, gateway_request_id DESC): the Tier 1 index
(tenant_id, occurred_at, gateway_request_id) read backwards, partition after partition, so a page
costs its own rows, never a sort of the range and never an OFFSET. The next page starts strictly
after the last row of this one, so rows that share an `occurred_at` are neither lost nor repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Final

from llm_usage.storage.pool import Connection

# The filters a page may take: each is an equality on the event column of the same name.
FILTER_COLUMNS: Final = ("user_id", "agent_id", "deployment_id", "model")


@dataclass(frozen=True, slots=True)
class StoredUsageEvent:
    """One row of `llm_usage_events`, every column, as stored."""

    gateway_request_id: str
    tenant_id: str
    deployment_id: str | None
    user_id: str | None
    agent_id: str | None
    channel: str | None
    feature: str | None
    provider: str | None
    model: str | None
    request_kind: str | None
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    total_tokens: int
    upstream_cost_usd: Decimal | None
    customer_charge_usd: Decimal
    customer_charge_cents: int | None
    markup_mode: str | None
    occurred_at: datetime
    received_at: datetime


_SELECTED: Final = ", ".join(field.name for field in fields(StoredUsageEvent))


@dataclass(frozen=True, slots=True)
class EventPosition:
    """Where a page ended: the sort key of its last row. The next page starts after it."""

    occurred_at: datetime
    gateway_request_id: str


@dataclass(frozen=True, slots=True)
class UsageEventPage:
    """Events newest first; `more`: further events lie beyond the page in the direction read
    (older when read after a position or from the top, newer when read before one)."""

    items: list[StoredUsageEvent]
    more: bool

    @property
    def first(self) -> EventPosition | None:
        return _position(self.items[0]) if self.items else None

    @property
    def last(self) -> EventPosition | None:
        return _position(self.items[-1]) if self.items else None


def _position(event: StoredUsageEvent) -> EventPosition:
    return EventPosition(event.occurred_at, event.gateway_request_id)


def page_query(filters: tuple[str, ...], *, bound: str | None) -> str:
    """The page's SQL: $1 tenant, $2 start, $3 end, $4 limit, then the position's two values
    when `bound` is "after" (older rows, newest first) or "before" (newer rows, oldest first),
    then one value per filter column (names only from FILTER_COLUMNS)."""
    conditions = ["tenant_id = $1", "occurred_at >= $2", "occurred_at < $3"]
    order = "DESC"
    number = 5
    if bound is not None:
        # A row comparison the btree takes as one bound on (occurred_at, gateway_request_id).
        comparison = {"after": "<", "before": ">"}[bound]
        conditions.append(f"(occurred_at, gateway_request_id) {comparison} ($5, $6)")
        order = "DESC" if bound == "after" else "ASC"
        number = 7
    for column in filters:
        if column not in FILTER_COLUMNS:
            raise ValueError(f"cannot filter events by {column!r}")
        conditions.append(f"{column} = ${number}")
        number += 1
    return (
        f"SELECT {_SELECTED} FROM llm_usage_events WHERE {' AND '.join(conditions)} "
        f"ORDER BY occurred_at {order}, gateway_request_id {order} LIMIT $4"
    )


async def usage_event_page(
    connection: Connection,
    tenant_id: str,
    *,
    start: datetime,
    end: datetime,
    limit: int,
    after: EventPosition | None = None,
    before: EventPosition | None = None,
    filters: dict[str, str] | None = None,
) -> UsageEventPage:
    """At most `limit` of the tenant's events with start <= occurred_at < end, matching every
    filter (column -> value), newest first: the newest ones strictly older than `after`, or the
    oldest ones strictly newer than `before` (the page before a page), or the newest of all."""
    if after is not None and before is not None:
        raise ValueError("a page is read after a position or before one, not both")
    chosen = {column: value for column, value in (filters or {}).items() if value is not None}
    columns = tuple(sorted(chosen))
    position = after or before
    bound = None if position is None else ("after" if after is not None else "before")
    values = () if position is None else (position.occurred_at, position.gateway_request_id)
    # One row more than asked for says whether there is more beyond the page.
    rows = await connection.fetch(
        page_query(columns, bound=bound),
        tenant_id,
        start,
        end,
        limit + 1,
        *values,
        *(chosen[c] for c in columns),
    )
    items = [StoredUsageEvent(**dict(row)) for row in rows[:limit]]
    if bound == "before":
        items.reverse()
    return UsageEventPage(items=items, more=len(rows) > limit)
