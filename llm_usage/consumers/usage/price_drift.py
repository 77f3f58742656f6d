"""The usage consumer's check of the gateway's upstream costs: per batch, the events whose
`upstream_cost_usd` is beyond tolerance of the price table's list cost are counted per provider
and model, so a stale price table at the gateway is found in minutes (alert
`LLMUsagePriceDrift`), not at month end by `prices drift`.

Cheap on purpose: an event without an upstream cost, or whose pair has no rows, costs one
attribute read or one dict lookup; the label values are pairs of the price table only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter

from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.domain.price_drift import ABSOLUTE_FLOOR_USD, DEFAULT_TOLERANCE
from llm_usage.domain.prices import Price, in_effect
from llm_usage.schemas.usage_event import UsageRow

PRICE_DRIFT_METRIC = "llm_usage_price_drift_events_total"


def price_drift_counter(registry: CollectorRegistry) -> Counter:
    """The counter `count_drift` increments, registered in `registry`."""
    return Counter(
        PRICE_DRIFT_METRIC,
        "Events whose upstream_cost_usd differs from the price table's list cost for their "
        "tokens by more than the tolerance (1 %, at least 0.000001 USD), by provider and model.",
        ["provider", "model"],
        registry=registry,
    )


def count_drift(
    rows: Iterable[UsageRow],
    prices_by_pair: Mapping[tuple[str, str], Sequence[Price]],
    counter: Counter,
    *,
    tolerance: Decimal = DEFAULT_TOLERANCE,
) -> int:
    """Increment `counter` once per event of `rows` beyond tolerance, checked against the row of
    `prices_by_pair` (each pair's rows in ascending `effective_from`) in effect at its
    `occurred_at`; return how many were. Events without an upstream cost or a price are skipped.

    The same decision as `domain.price_drift.check_event`, in whole numbers: each row's rates
    are scaled once to integers, so an event costs a few integer products and two exact decimal
    comparisons instead of a dozen decimal operations (a unit test holds the two equal).
    """
    beyond: dict[tuple[str, str], int] = {}
    scaled: dict[int, _ScaledRates] = {}  # by id(): the rows outlive this call
    for row in rows:
        upstream = row.upstream_cost_usd
        if upstream is None:
            continue
        pair = (row.provider, row.model)
        prices = prices_by_pair.get(pair)  # type: ignore[arg-type]  # a null never matches
        if not prices:
            continue
        price = in_effect(prices, row.occurred_at)
        if price is None:
            continue
        rates = scaled.get(id(price))
        if rates is None:
            rates = scaled[id(price)] = _ScaledRates.of(price, tolerance)
        if rates.beyond(row, upstream):
            key = (str(row.provider), str(row.model))
            beyond[key] = beyond.get(key, 0) + 1
    for (provider, model), count in beyond.items():
        counter.labels(provider, model).inc(count)
    return sum(beyond.values())


@dataclass(frozen=True)
class _ScaledRates:
    """A price row's rates and fee as integers at one scale: list cost = total / 10**scale."""

    input: int
    cached_input: int
    output: int
    reasoning: int
    fee: int
    scale: int
    tolerance: tuple[int, int]  # as a fraction: numerator, denominator
    floor: int  # ABSOLUTE_FLOOR_USD at the same scale (the scale is at least 6)

    @classmethod
    def of(cls, price: Price, tolerance: Decimal) -> _ScaledRates:
        rates = (price.input, price.cached_input, price.output, price.reasoning)
        fee = price.request_fee_usd.scaleb(6, EXACT_CONTEXT)  # per million, like the rates
        places = max(0, *(-int(value.as_tuple().exponent) for value in (*rates, fee)))
        input, cached_input, output, reasoning, whole_fee = (
            int(value.scaleb(places, EXACT_CONTEXT)) for value in (*rates, fee)
        )
        scale = places + 6
        floor = int(ABSOLUTE_FLOOR_USD.scaleb(scale, EXACT_CONTEXT))
        ratio = tolerance.as_integer_ratio()
        return cls(input, cached_input, output, reasoning, whole_fee, scale, ratio, floor)

    def beyond(self, row: UsageRow, upstream: Decimal) -> bool:
        cached, reasoning = row.cached_input_tokens, row.reasoning_tokens
        if cached > row.input_tokens or reasoning > row.output_tokens:
            return False  # cannot be priced: `check_event` counts it as unpriced, not drift
        total = (
            (row.input_tokens - cached) * self.input
            + cached * self.cached_input
            + (row.output_tokens - reasoning) * self.output
            + reasoning * self.reasoning
            + self.fee
        )
        numerator, denominator = self.tolerance
        exact = EXACT_CONTEXT
        scaled = upstream.scaleb(self.scale, exact)
        if scaled != scaled.to_integral_value():  # more digits than the rates: rare, exact
            gap = abs(exact.subtract(scaled, total))
            return gap > self.floor and exact.multiply(gap, denominator) > total * numerator
        difference = abs(int(scaled) - total)
        return difference > self.floor and difference * denominator > total * numerator
