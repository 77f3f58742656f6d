"""Checking the gateway against the price table: what an event's tokens cost at list price, and
whether the provider's cost the gateway reported (`upstream_cost_usd`) is within tolerance of it.
Pure functions over exact decimals; `prices drift` and the usage consumer's drift counter both
decide here.

The tolerance is relative to the list cost, with an absolute floor. Relative, because a stale
price moves every event of a pair by the same fraction (a 1 % check finds a 10 % price change on
any volume), while a gateway that rounds the provider's cost to a few digits, or a provider that
rounds per request, stays far inside 1 %. The floor of one micro-dollar keeps tiny requests
from drifting on rounding alone: 10 tokens at 0.15 USD per million cost 0.0000015 USD, which a
gateway rounding to 6 digits reports as 0.000002 — 33 % off, and 0.0000005 USD.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.domain.prices import Price, UnpriceableTokensError, cost_usd

DEFAULT_TOLERANCE = Decimal("0.01")
ABSOLUTE_FLOOR_USD = Decimal("0.000001")

# (provider, model) as the events carry them: either may be null.
EventPair = tuple[str | None, str | None]


def beyond_tolerance(
    upstream_usd: Decimal,
    list_usd: Decimal,
    tolerance: Decimal = DEFAULT_TOLERANCE,
    *,
    floor_usd: Decimal = ABSOLUTE_FLOOR_USD,
) -> bool:
    """Whether `upstream_usd` differs from `list_usd` by more than `tolerance` * `list_usd`
    (a fraction: 0.01 is 1 %) and by more than `floor_usd`. Exactly at the limit is within."""
    exact = EXACT_CONTEXT
    difference = abs(exact.subtract(upstream_usd, list_usd))
    return difference > max(exact.multiply(tolerance, list_usd), floor_usd)


@dataclass(frozen=True)
class DriftCheck:
    """One event checked: its cost at list price (None when no row was in effect, or its tokens
    cannot be priced) beside what the gateway reported."""

    pair: EventPair
    upstream_usd: Decimal
    list_usd: Decimal | None
    beyond: bool

    @property
    def difference_usd(self) -> Decimal | None:
        """Upstream minus list: positive when the gateway paid more than the table says."""
        if self.list_usd is None:
            return None
        return EXACT_CONTEXT.subtract(self.upstream_usd, self.list_usd)


def check_event(
    pair: EventPair,
    *,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int,
    reasoning_tokens: int,
    upstream_usd: Decimal,
    price: Price | None,
    tolerance: Decimal = DEFAULT_TOLERANCE,
) -> DriftCheck:
    """Compare one event's `upstream_usd` with its tokens' cost under `price`, the row in effect
    at its `occurred_at` (None when there is none)."""
    if price is None:
        return DriftCheck(pair, upstream_usd, None, False)
    try:
        list_usd = cost_usd(
            price,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            reasoning_tokens=reasoning_tokens,
        )
    except UnpriceableTokensError:
        return DriftCheck(pair, upstream_usd, None, False)
    return DriftCheck(
        pair, upstream_usd, list_usd, beyond_tolerance(upstream_usd, list_usd, tolerance)
    )


@dataclass(frozen=True)
class PairDrift:
    """One (provider, model)'s events with an upstream cost over a period: how many were
    compared, how many were beyond tolerance, the exact sums, and how many could not be priced
    (no row in effect at their time, or contradictory tokens) with their upstream sum."""

    provider: str | None
    model: str | None
    compared: int = 0
    beyond: int = 0
    upstream_usd: Decimal = Decimal(0)
    list_usd: Decimal = Decimal(0)
    unpriced: int = 0
    unpriced_upstream_usd: Decimal = Decimal(0)

    @property
    def difference_usd(self) -> Decimal:
        """Upstream minus list over the compared events."""
        return EXACT_CONTEXT.subtract(self.upstream_usd, self.list_usd)

    @property
    def drifts(self) -> bool:
        """What `prices drift` lists: events beyond tolerance, or events it could not check."""
        return self.beyond > 0 or self.unpriced > 0

    def add(self, check: DriftCheck) -> PairDrift:
        exact = EXACT_CONTEXT
        if check.list_usd is None:
            return PairDrift(
                self.provider,
                self.model,
                self.compared,
                self.beyond,
                self.upstream_usd,
                self.list_usd,
                self.unpriced + 1,
                exact.add(self.unpriced_upstream_usd, check.upstream_usd),
            )
        return PairDrift(
            self.provider,
            self.model,
            self.compared + 1,
            self.beyond + check.beyond,
            exact.add(self.upstream_usd, check.upstream_usd),
            exact.add(self.list_usd, check.list_usd),
            self.unpriced,
            self.unpriced_upstream_usd,
        )


def _pair_order(pair: EventPair) -> tuple[bool, str, bool, str]:
    provider, model = pair
    return (provider is None, provider or "", model is None, model or "")


class DriftTally:
    """Checks added one at a time, grouped per (provider, model): a month's events are streamed
    through it, never held."""

    def __init__(self) -> None:
        self._groups: dict[EventPair, PairDrift] = {}

    def add(self, check: DriftCheck) -> None:
        group = self._groups.get(check.pair)
        if group is None:
            group = PairDrift(*check.pair)
        self._groups[check.pair] = group.add(check)

    def by_pair(self) -> list[PairDrift]:
        """The groups sorted by provider then model (nulls last)."""
        return [self._groups[pair] for pair in sorted(self._groups, key=_pair_order)]


def drift_by_pair(checks: Iterable[DriftCheck]) -> list[PairDrift]:
    """The checks grouped per (provider, model), sorted by provider then model (nulls last)."""
    tally = DriftTally()
    for check in checks:
        tally.add(check)
    return tally.by_pair()
