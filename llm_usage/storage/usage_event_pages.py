"""A tenant's stored usage events, newest first, one keyset page at a time.

Pages are ordered by (occurred_at DESC, gateway_request_id DESC): the Tier 1 index
(tenant_id, occurred_at, gateway_request_id) read backwards, partition after partition, so a page
costs its own rows, never a sort of the range and never an OFFSET. The next page starts strictly
after the last row of this one, so rows that share an `occurred_at` are neither lost nor repeated.

Each event comes with its effective values: `usage_event_effective` (a row per corrected event,
keyed as the event) is probed per row read, and the filters on attribution judge the effective
deployment, user and agent, as the reports do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Final

import asyncpg

from llm_usage.domain.corrections import Effective, original
from llm_usage.storage.pool import Connection

# The filters a page may take: each is an equality on the event's attribute of the same name
# (the effective one for those a correction may change).
FILTER_COLUMNS: Final = ("user_id", "agent_id", "deployment_id", "model")
EFFECTIVE_COLUMNS: Final = tuple(column.name for column in fields(Effective))


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
    charge_estimated: bool
    price_effective_from: datetime | None


STORED_COLUMNS: Final = tuple(column.name for column in fields(StoredUsageEvent))


@dataclass(frozen=True, slots=True)
class UsageEventItem(StoredUsageEvent):
    """A stored event with what it contributes now (its own values unless `corrected`)."""

    effective: Effective
    corrected: bool


# The event's columns, then the effective row's (null when never corrected) as `f_<column>`.
_SELECTED: Final = ", ".join(
    [f"e.{column}" for column in STORED_COLUMNS]
    + ["f.tenant_id IS NOT NULL AS corrected"]
    + [f"f.{column} AS f_{column}" for column in EFFECTIVE_COLUMNS]
)
_JOINED: Final = (
    "llm_usage_events AS e LEFT JOIN usage_event_effective AS f ON f.tenant_id = e.tenant_id "
    "AND f.occurred_at = e.occurred_at AND f.gateway_request_id = e.gateway_request_id"
)


@dataclass(frozen=True, slots=True)
class EventPosition:
    """Where a page ended: the sort key of its last row. The next page starts after it."""

    occurred_at: datetime
    gateway_request_id: str


@dataclass(frozen=True, slots=True)
class UsageEventPage:
    """Events newest first; `more`: further events lie beyond the page in the direction read
    (older when read after a position or from the top, newer when read before one)."""

    items: list[UsageEventItem]
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
    """The page's SQL: $1 tenant, $2 start, $3 end, $4 limit, then for a `bound` of "after"
    (older rows, newest first) or "before" (newer rows, oldest first) the position's id as $5,
    then one value per filter column (names only from FILTER_COLUMNS).

    With a bound, the range's edge on that side is folded into the position (see `_bounds`)
    and the position's time passed as that edge. The scalar `occurred_at <= $3` (or `>= $2`)
    beside the row comparison is implied by it, and there for two reasons: it prunes the
    partitions beyond the position (without it the planner may sort every month ahead of it),
    and it is the key the btree starts from, so a page deep in the range starts among the ties
    of its position instead of walking every newer entry (PostgreSQL 15 starts from a scalar
    `occurred_at < end` over the row comparison, which cost a page 6,533 buffers 295,000
    events deep instead of 106).
    """
    conditions = ["e.tenant_id = $1"]
    if bound == "after":
        conditions += [
            "e.occurred_at >= $2",
            "e.occurred_at <= $3",
            "(e.occurred_at, e.gateway_request_id) < ($3, $5)",
        ]
    elif bound == "before":
        conditions += [
            "e.occurred_at >= $2",
            "(e.occurred_at, e.gateway_request_id) > ($2, $5)",
            "e.occurred_at < $3",
        ]
    else:
        conditions += ["e.occurred_at >= $2", "e.occurred_at < $3"]
    order = "ASC" if bound == "before" else "DESC"
    number = 5 if bound is None else 6
    for column in filters:
        if column not in FILTER_COLUMNS:
            raise ValueError(f"cannot filter events by {column!r}")
        conditions.append(_equal(column, number))
        number += 1
    return (
        f"SELECT {_SELECTED} FROM {_JOINED} WHERE {' AND '.join(conditions)} "
        f"ORDER BY e.occurred_at {order}, e.gateway_request_id {order} LIMIT $4"
    )


def _equal(column: str, number: int) -> str:
    """The event's attribute as it counts now (the effective row's for a corrected event) equals
    parameter `number`. Written as a boolean CASE rather than `CASE … END = $n`: the planner
    takes an equality on an expression to keep 0.5 % of the rows, then expects a filtered page
    to read the whole range and sorts it; a boolean expression it takes as keeping half."""
    if column not in EFFECTIVE_COLUMNS:
        return f"e.{column} = ${number}"
    return (
        f"CASE WHEN f.tenant_id IS NULL THEN e.{column} = ${number} ELSE f.{column} = ${number} END"
    )


def _bounds(
    start: datetime, end: datetime, *, after: EventPosition | None, before: EventPosition | None
) -> tuple[datetime, datetime, tuple[str, ...]]:
    """$2, $3 and the position's id for `page_query`. An id is never empty, so
    `occurred_at < end` is `(occurred_at, id) < (end, '')` and `occurred_at >= start` is
    `(occurred_at, id) > (start, '')`: the tighter of the edge and the position is one row bound."""
    if after is not None:
        if after.occurred_at < end:
            return start, after.occurred_at, (after.gateway_request_id,)
        return start, end, ("",)
    if before is not None:
        if before.occurred_at >= start:
            return before.occurred_at, end, (before.gateway_request_id,)
        return start, end, ("",)
    return start, end, ()


@dataclass(frozen=True, slots=True)
class EventPageRequest:
    """A page: the tenant's events with start <= occurred_at < end matching every filter
    (column -> value), newest first, at most `limit` of them: the newest ones strictly older than
    `after`, or the oldest ones strictly newer than `before` (the page before a page), or the
    newest of all."""

    start: datetime
    end: datetime
    limit: int
    after: EventPosition | None = None
    before: EventPosition | None = None
    filters: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.after is not None and self.before is not None:
            raise ValueError("a page is read after a position or before one, not both")
        if not set(self.filters) <= set(FILTER_COLUMNS):
            raise ValueError(f"cannot filter events by {sorted(self.filters)}")


def page_statement(tenant_id: str, request: EventPageRequest) -> tuple[str, tuple[object, ...]]:
    """The SQL and arguments of `usage_event_page` (one row more than the limit)."""
    columns = tuple(sorted(request.filters))
    after, before = request.after, request.before
    bound = "after" if after is not None else "before" if before is not None else None
    lower, upper, position_id = _bounds(request.start, request.end, after=after, before=before)
    # One row more than asked for says whether there is more beyond the page.
    arguments = (
        tenant_id,
        lower,
        upper,
        request.limit + 1,
        *position_id,
        *(request.filters[c] for c in columns),
    )
    return page_query(columns, bound=bound), arguments


async def usage_event_page(
    connection: Connection, tenant_id: str, request: EventPageRequest
) -> UsageEventPage:
    """The page `request` asks for of the tenant's events."""
    query, arguments = page_statement(tenant_id, request)
    rows = await connection.fetch(query, *arguments)
    items = [_item(row) for row in rows[: request.limit]]
    if request.before is not None:
        items.reverse()
    return UsageEventPage(items=items, more=len(rows) > request.limit)


def _item(row: asyncpg.Record) -> UsageEventItem:
    stored = {column: row[column] for column in STORED_COLUMNS}
    if row["corrected"]:
        effective = Effective(**{column: row[f"f_{column}"] for column in EFFECTIVE_COLUMNS})
    else:
        effective = original(StoredUsageEvent(**stored))
    return UsageEventItem(**stored, effective=effective, corrected=row["corrected"])
