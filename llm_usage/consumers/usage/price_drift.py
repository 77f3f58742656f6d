"""The usage consumer's check of the gateway's upstream costs: per batch, the events whose
`upstream_cost_usd` is beyond tolerance of the price table's list cost are counted per provider
and model, so a stale price table at the gateway is found in minutes (alert
`LLMUsagePriceDrift`), not at month end by `prices drift`.

Cheap on purpose: an event without an upstream cost, or whose pair has no rows, costs one
attribute read or one dict lookup; the label values are pairs of the price table only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter

from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.domain.price_drift import ABSOLUTE_FLOOR_USD, DEFAULT_TOLERANCE
from llm_usage.domain.prices import Price, UnpriceableTokensError, in_effect
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

    The same decision as `domain.price_drift.check_event`, in whole numbers (each row's
    `whole_rates`), so an event costs a few integer products and two decimal scalings instead
    of a dozen decimal operations (a unit test holds the two equal).
    """
    beyond: dict[tuple[str, str], int] = {}
    numerator, denominator = tolerance.as_integer_ratio()
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
        rates = price.whole_rates
        try:
            total = rates.total(
                input_tokens=row.input_tokens,
                output_tokens=row.output_tokens,
                cached_input_tokens=row.cached_input_tokens,
                reasoning_tokens=row.reasoning_tokens,
            )
        except UnpriceableTokensError:
            continue  # `check_event` counts it as unpriced, not as drift
        if _beyond(upstream, total, rates.scale, numerator, denominator):
            key = (str(row.provider), str(row.model))
            beyond[key] = beyond.get(key, 0) + 1
    for (provider, model), count in beyond.items():
        counter.labels(provider, model).inc(count)
    return sum(beyond.values())


def _beyond(upstream: Decimal, total: int, scale: int, numerator: int, denominator: int) -> bool:
    """`beyond_tolerance` with the list cost as total / 10**scale, in whole numbers."""
    exact = EXACT_CONTEXT
    floor = ABSOLUTE_FLOOR_USD.scaleb(scale, exact)
    scaled = upstream.scaleb(scale, exact)
    if scaled != scaled.to_integral_value():  # more digits than the rates: rare, exact
        gap = abs(exact.subtract(scaled, total))
        return gap > floor and exact.multiply(gap, denominator) > total * numerator
    difference = abs(int(scaled) - total)
    return difference > floor and difference * denominator > total * numerator
