"""The price table's rules: what a priced event costs, which row is in effect, which change is
allowed. Pure functions over exact decimals; storage, the consumers, the CLI and the API all
use these and nothing else to price.

Token arithmetic follows OpenAI's and OpenTelemetry GenAI's convention: `cached_input_tokens`
are part of `input_tokens` and `reasoning_tokens` part of `output_tokens`, so each token is
priced once, at the rate of its kind.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from llm_usage.domain.money import EXACT_CONTEXT

# A change takes effect at least this long after it is made. Events may be stamped up to five
# minutes ahead of the clock that reads them, so a row added now could otherwise apply to an
# event one consumer has already priced from the row before it: the lead keeps every event's
# row fixed before any consumer can see the event, and lets consumers cache the table.
PRICE_CHANGE_LEAD = timedelta(minutes=10)
# How long a consumer may trust its copy of a pair's rows: well inside the lead minus the
# five minutes of future skew an event may carry.
PRICE_CACHE_SECONDS = 60.0
_PER_MILLION = -6


@dataclass(frozen=True)
class Price:
    """One row of the table: USD per million tokens of each kind, from `effective_from` (UTC)
    until the pair's next row. `request_fee_usd` is added once per request."""

    provider: str
    model: str
    effective_from: datetime
    input: Decimal
    cached_input: Decimal
    output: Decimal
    reasoning: Decimal
    request_fee_usd: Decimal = Decimal(0)
    # When the row was added (the database's clock); None for a row not stored yet.
    created_at: datetime | None = None

    @property
    def pair(self) -> tuple[str, str]:
        return (self.provider, self.model)

    @functools.cached_property
    def whole_rates(self) -> WholeRates:
        """The rates as whole numbers, worked out once per row (a consumer prices thousands of
        events from one)."""
        return WholeRates.of(self)


def new_price(
    provider: str,
    model: str,
    effective_from: datetime,
    *,
    input: Decimal,
    output: Decimal,
    cached_input: Decimal | None = None,
    reasoning: Decimal | None = None,
    request_fee_usd: Decimal | None = None,
) -> Price:
    """A row with the contract's defaults: cached input at the input price, reasoning at the
    output price, no request fee."""
    return Price(
        provider,
        model,
        effective_from,
        input=input,
        cached_input=input if cached_input is None else cached_input,
        output=output,
        reasoning=output if reasoning is None else reasoning,
        request_fee_usd=Decimal(0) if request_fee_usd is None else request_fee_usd,
    )


class UnpriceableTokensError(ValueError):
    """The token counts contradict the convention (more cached than input tokens, or more
    reasoning than output tokens), so no price can be computed from them."""


@dataclass(frozen=True)
class WholeRates:
    """A row's rates (per million tokens) and fee as whole numbers at one scale, so that a cost
    is integer arithmetic: cost in USD = `total(...)` / 10**`scale`, exactly."""

    input: int
    cached_input: int
    output: int
    reasoning: int
    fee: int
    scale: int

    @classmethod
    def of(cls, price: Price) -> WholeRates:
        rates = (price.input, price.cached_input, price.output, price.reasoning)
        fee = price.request_fee_usd.scaleb(-_PER_MILLION, EXACT_CONTEXT)  # per million too
        places = max(0, *(-int(value.as_tuple().exponent) for value in (*rates, fee)))
        input, cached_input, output, reasoning, whole_fee = (
            int(value.scaleb(places, EXACT_CONTEXT)) for value in (*rates, fee)
        )
        return cls(input, cached_input, output, reasoning, whole_fee, places - _PER_MILLION)

    def total(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int,
        reasoning_tokens: int,
    ) -> int:
        """The cost times 10**scale; refuses tokens that contradict the convention."""
        if cached_input_tokens > input_tokens:
            raise UnpriceableTokensError(
                f"cached_input_tokens ({cached_input_tokens}) exceeds input_tokens ({input_tokens})"
            )
        if reasoning_tokens > output_tokens:
            raise UnpriceableTokensError(
                f"reasoning_tokens ({reasoning_tokens}) exceeds output_tokens ({output_tokens})"
            )
        return (
            (input_tokens - cached_input_tokens) * self.input
            + cached_input_tokens * self.cached_input
            + (output_tokens - reasoning_tokens) * self.output
            + reasoning_tokens * self.reasoning
            + self.fee
        )


def cost_usd(
    price: Price,
    *,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int,
    reasoning_tokens: int,
) -> Decimal:
    """The exact charge of one request under `price`, never rounded: uncached input, cached
    input, non-reasoning output and reasoning tokens each at their rate, over a million, plus
    the request fee."""
    rates = price.whole_rates
    total = rates.total(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached_input_tokens,
        reasoning_tokens=reasoning_tokens,
    )
    return Decimal(total).scaleb(-rates.scale, EXACT_CONTEXT)


def in_effect(rows: Sequence[Price], at: datetime) -> Price | None:
    """The row of one pair in effect at `at`: the latest whose `effective_from` ≤ `at`.
    `rows` are that pair's rows in ascending `effective_from`."""
    index = bisect.bisect_right(rows, at, key=lambda row: row.effective_from)
    return rows[index - 1] if index else None


def in_effect_for_event(rows: Sequence[Price], at: datetime, *, replayed: bool) -> Price | None:
    """The row that prices an event of `at`: `in_effect`, except that a row added less than
    `PRICE_CHANGE_LEAD` before `at` does not price a live event.

    Only a pair's first row can be such a row (every later one starts at least the lead after it
    is added), when it was backdated or starts soon. Without this rule a consumer that read
    the table just before the row was added and one that read it just after would disagree on
    an event stamped up to five minutes ahead. A replayed dead letter (`dlq replay`, after the
    price was added on purpose) is priced from `effective_from` alone.
    """
    row = in_effect(rows, at)
    if row is None or replayed or row.created_at is None:
        return row
    return row if row.created_at + PRICE_CHANGE_LEAD <= at else None


def refusal_of_new_price(new: Price, existing: Sequence[Price], *, now: datetime) -> str | None:
    """Why `new` may not join its pair's `existing` rows at `now`, or None when it may.

    A pair's first row may start at any time (no event was ever priced by that pair, so
    history cannot change: it lets `unpriced` dead letters be replayed). Every later row starts
    at least `PRICE_CHANGE_LEAD` from now and after every existing row, so a row whose time has
    come never changes and an event's row is fixed before any consumer reads the event.
    """
    for name in ("input", "cached_input", "output", "reasoning", "request_fee_usd"):
        value: Decimal = getattr(new, name)
        if not value.is_finite() or value < 0:
            return f"{name} must be a decimal ≥ 0, not {value}"
    if not existing:
        return None
    earliest_allowed = now + PRICE_CHANGE_LEAD
    if new.effective_from < earliest_allowed:
        return (
            f"{new.provider}/{new.model} already has prices: a change must take effect at least "
            f"{int(PRICE_CHANGE_LEAD.total_seconds() // 60)} minutes from now (at or after "
            f"{earliest_allowed.isoformat()}), not {new.effective_from.isoformat()}"
        )
    latest = max(row.effective_from for row in existing)
    if new.effective_from <= latest:
        return (
            f"{new.provider}/{new.model} already has a row from {latest.isoformat()}: a change "
            "must take effect after it"
        )
    return None
