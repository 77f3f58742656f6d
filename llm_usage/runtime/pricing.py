"""The consumers' copy of the price table, and how an event that sent no charge is priced.

Both consumers price an unpriced event from the same immutable row (domain/prices.py), so they
agree on its charge. The copy is read again when it is older than `PRICE_CACHE_SECONDS`, which
is safe because a row added after the copy was read cannot price an event a consumer sees
before the next read (the rule of `in_effect_for_event`); and before a batch holding a replayed
dead letter, whose price an operator has usually just added.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg

from llm_usage.domain.prices import (
    PRICE_CACHE_SECONDS,
    Price,
    UnpriceableTokensError,
    cost_usd,
    in_effect_for_event,
)
from llm_usage.runtime.handler import Record
from llm_usage.schemas.dead_letter import REPLAYED_FROM_HEADER, DeadLetterReason, Rejection
from llm_usage.schemas.usage_event import UnpricedEvent, UsageRow
from llm_usage.storage.pool import connection_from
from llm_usage.storage.prices import load_prices

PricesByPair = Mapping[tuple[str, str], Sequence[Price]]
_CHARGE = UsageRow._fields.index("customer_charge_usd")
_new_row = tuple.__new__


def is_replayed(record: Record) -> bool:
    """Whether `dlq replay` republished this record."""
    headers = record.headers
    return bool(headers) and any(name == REPLAYED_FROM_HEADER for name, _ in headers)


@dataclass(frozen=True)
class PriceSnapshot:
    """The price table as read at one moment, by (provider, model), rows in ascending
    `effective_from`."""

    rows: PricesByPair = field(default_factory=dict)

    def estimate(self, event: UnpricedEvent, *, replayed: bool) -> UsageRow | Rejection:
        """`event` with its charge computed from the row in effect at its `occurred_at`
        (`charge_estimated`, and that row's `effective_from`), or why it is `unpriced`."""
        row = event.row
        if row.provider is None or row.model is None:
            return Rejection(
                DeadLetterReason.UNPRICED,
                "neither customer_charge_usd nor customer_charge_cents was sent, and without "
                "both provider and model no price can apply",
            )
        price = in_effect_for_event(
            self.rows.get((row.provider, row.model), ()), row.occurred_at, replayed=replayed
        )
        if price is None:
            return Rejection(
                DeadLetterReason.UNPRICED,
                f"no charge was sent and no price for provider {row.provider!r}, model "
                f"{row.model!r} is in effect at {row.occurred_at.isoformat()}: add one "
                "(llm-usage prices set) and replay (llm-usage dlq replay --reason unpriced)",
            )
        try:
            charge = cost_usd(
                price,
                input_tokens=row.input_tokens,
                output_tokens=row.output_tokens,
                cached_input_tokens=row.cached_input_tokens,
                reasoning_tokens=row.reasoning_tokens,
            )
        except UnpriceableTokensError as error:
            return Rejection(DeadLetterReason.SCHEMA_VIOLATION, f"cannot price the event: {error}")
        # The row with its charge and the row that priced it: _replace, at a third of the cost.
        return _new_row(
            UsageRow, (*row[:_CHARGE], charge, *row[_CHARGE + 1 : -1], price.effective_from)
        )

    def price(self, record: Record, event: UnpricedEvent) -> UsageRow | Rejection:
        return self.estimate(event, replayed=is_replayed(record))


class PriceBook:
    """A consumer's price table: read whole, again when stale or before a replay."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_age_seconds: float = PRICE_CACHE_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._max_age = max_age_seconds
        self._monotonic = monotonic
        self._snapshot: PriceSnapshot | None = None
        self._read_at = 0.0

    async def ready(self, records: Sequence[Record]) -> PriceSnapshot:
        """A copy fresh enough to price `records` with."""
        stale = self._monotonic() - self._read_at >= self._max_age
        if self._snapshot is None or stale or any(map(is_replayed, records)):
            async with connection_from(self._pool) as connection:
                rows = await load_prices(connection, None)
            self._snapshot = PriceSnapshot(rows)
            self._read_at = self._monotonic()
        return self._snapshot
