"""Checking the gateway's upstream costs against the price table: the tolerance at its edges,
events without a price, exact sums per pair, and the consumer's per-batch counter."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from llm_usage.consumers.usage.price_drift import (
    PRICE_DRIFT_METRIC,
    count_drift,
    price_drift_counter,
)
from llm_usage.domain.price_drift import (
    ABSOLUTE_FLOOR_USD,
    DEFAULT_TOLERANCE,
    DriftCheck,
    beyond_tolerance,
    check_event,
    drift_by_pair,
)
from llm_usage.domain.prices import Price, new_price
from llm_usage.schemas.usage_event import UsageRow
from tests.money import exact_sum

D = Decimal
# An arbitrary instant: these checks compare rows with each other, never with the calendar.
T0 = datetime(2026, 1, 1, tzinfo=UTC)
PRICE = new_price("openai", "gpt-4o-mini", T0, input=D("0.15"), output=D("0.60"))
NEWER = new_price("openai", "gpt-4o-mini", T0 + timedelta(days=10), input=D("1.5"), output=D("6"))


@pytest.mark.parametrize(
    ("upstream", "list_cost", "tolerance", "beyond"),
    [
        ("1.00", "1.00", "0.01", False),  # equal
        ("1.01", "1.00", "0.01", False),  # exactly at 1 %: within
        ("0.99", "1.00", "0.01", False),  # exactly at -1 %: within
        ("1.010000000000000001", "1.00", "0.01", True),  # just past it
        ("0.989999999999999999", "1.00", "0.01", True),
        ("1.05", "1.00", "0.05", False),  # a wider tolerance
        ("0", "1.00", "0.01", True),  # a free upstream cost is drift
        ("0.000001", "0", "0.01", False),  # a free model: the floor still applies
        ("0.000001000000000001", "0", "0.01", True),
        ("0.000002", "0.0000015", "0.01", False),  # rounded to 6 digits: 33 % but under the floor
        ("0.0000026", "0.0000015", "0.01", True),  # past the floor
        ("123456789012.123456789012345678", "123456789012.123456789012345678", "0", False),
        ("123456789012.123456789012345679", "123456789012.123456789012345678", "0", False),
    ],
)
def test_the_tolerance_is_relative_with_an_absolute_floor(
    upstream: str, list_cost: str, tolerance: str, beyond: bool
) -> None:
    assert beyond_tolerance(D(upstream), D(list_cost), D(tolerance)) is beyond


def test_the_defaults_are_one_percent_and_one_micro_dollar() -> None:
    assert D("0.01") == DEFAULT_TOLERANCE
    assert D("0.000001") == ABSOLUTE_FLOOR_USD
    assert not beyond_tolerance(D("101"), D("100"))
    assert beyond_tolerance(D("101.01"), D("100"))
    assert beyond_tolerance(D("0.5"), D("0.5"), D(0), floor_usd=D(0)) is False
    assert beyond_tolerance(D("0.5000001"), D("0.5"), D(0), floor_usd=D(0)) is True


def _check(upstream: str, price: Price | None = PRICE, **tokens: int) -> DriftCheck:
    counts = {"input_tokens": 1000, "output_tokens": 100, "cached_input_tokens": 0}
    counts |= {"reasoning_tokens": 0, **tokens}
    return check_event(
        ("openai", "gpt-4o-mini"),
        input_tokens=counts["input_tokens"],
        output_tokens=counts["output_tokens"],
        cached_input_tokens=counts["cached_input_tokens"],
        reasoning_tokens=counts["reasoning_tokens"],
        upstream_usd=D(upstream),
        price=price,
    )


def test_an_event_is_compared_with_its_list_cost() -> None:
    # 1000 x 0.15 / 10⁶ + 100 x 0.60 / 10⁶ = 0.00015 + 0.00006
    check = _check("0.00021")
    assert check.list_usd == D("0.00021")
    assert check.difference_usd == 0
    assert not check.beyond
    stale = _check("0.0021")  # the gateway pays ten times the table
    assert stale.beyond
    assert stale.difference_usd == D("0.00189")


def test_an_event_without_a_price_or_with_contradictory_tokens_is_not_compared() -> None:
    for check in (_check("1", price=None), _check("1", cached_input_tokens=1001)):
        assert check.list_usd is None
        assert check.difference_usd is None
        assert not check.beyond


def test_grouping_per_pair_sums_exactly_and_counts_the_unpriced() -> None:
    other = replace(PRICE, provider="anthropic", model="claude")
    upstreams = [D("0.000000000000000001"), D("123456789012.1"), D("0.00021")]
    checks = [_check(str(u)) for u in upstreams]
    checks.append(
        check_event(
            ("anthropic", "claude"),
            input_tokens=10,
            output_tokens=0,
            cached_input_tokens=0,
            reasoning_tokens=0,
            upstream_usd=D("0.0000015"),
            price=other,
        )
    )
    checks.append(
        check_event(
            (None, "gpt-4o-mini"),
            input_tokens=1,
            output_tokens=1,
            cached_input_tokens=0,
            reasoning_tokens=0,
            upstream_usd=D("0.3"),
            price=None,
        )
    )
    checks.append(_check("0.7", price=None))
    groups = drift_by_pair(checks)
    assert [(g.provider, g.model) for g in groups] == [
        ("anthropic", "claude"),
        ("openai", "gpt-4o-mini"),
        (None, "gpt-4o-mini"),
    ]
    claude, mini, nameless = groups
    assert (claude.compared, claude.beyond, claude.unpriced, claude.drifts) == (1, 0, 0, False)
    assert claude.list_usd == D("0.0000015")
    assert (mini.compared, mini.beyond, mini.unpriced) == (3, 2, 1)
    assert mini.upstream_usd == exact_sum(upstreams) == D("123456789012.100210000000000001")
    assert mini.list_usd == D("0.00063")
    assert mini.difference_usd == D("123456789012.099580000000000001")  # 28 digits would round
    assert mini.unpriced_upstream_usd == D("0.7")
    assert (nameless.compared, nameless.unpriced, nameless.drifts) == (0, 1, True)


def _row(upstream: Decimal | None, occurred_at: datetime, **fields: object) -> UsageRow:
    values: dict[str, object] = dict.fromkeys(UsageRow._fields)
    values |= {
        "gateway_request_id": "r",
        "tenant_id": "t",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_tokens": 1000,
        "output_tokens": 100,
        "cached_input_tokens": 0,
        "reasoning_tokens": 0,
        "total_tokens": 1100,
        "upstream_cost_usd": upstream,
        "customer_charge_usd": D("0.001"),
        "occurred_at": occurred_at,
        **fields,
    }
    return UsageRow(**values)  # type: ignore[arg-type]


def _sample(registry: CollectorRegistry, provider: str, model: str) -> float | None:
    return registry.get_sample_value(PRICE_DRIFT_METRIC, {"provider": provider, "model": model})


def test_the_counter_counts_events_beyond_tolerance_under_the_row_of_their_time() -> None:
    registry = CollectorRegistry()
    counter = price_drift_counter(registry)
    prices = {PRICE.pair: [PRICE, NEWER]}
    before, after = T0 + timedelta(days=1), NEWER.effective_from
    rows = [
        _row(D("0.00021"), before),  # matches the first row
        _row(D("0.0021"), before),  # beyond the first row
        _row(D("0.0021"), after),  # matches the newer row, in effect from exactly then
        _row(D("0.00021"), after),  # beyond the newer row
        _row(None, before),  # no upstream cost: skipped
        _row(D("9"), before - timedelta(days=2)),  # before any row: no price
        _row(D("9"), before, model="unknown"),  # a pair without rows
        _row(D("9"), before, provider=None),  # no pair at all
    ]
    assert count_drift(rows, prices, counter) == 2
    assert _sample(registry, "openai", "gpt-4o-mini") == 2
    assert _sample(registry, "openai", "unknown") is None
    assert count_drift(rows[:1], prices, counter) == 0
    assert _sample(registry, "openai", "gpt-4o-mini") == 2


_RATES = st.decimals(min_value=0, max_value=100, places=6, allow_nan=False, allow_infinity=False)
_TOKENS = st.integers(min_value=0, max_value=10**7)


@settings(max_examples=300, deadline=None)
@given(
    rates=st.tuples(_RATES, _RATES, _RATES, _RATES, _RATES.map(lambda fee: fee / 1000)),
    tokens=st.tuples(_TOKENS, _TOKENS, _TOKENS, _TOKENS),
    upstream=st.decimals(min_value=0, max_value=50, places=9, allow_nan=False),
    nudge=st.sampled_from([None, "just within", "just beyond"]),
)
def test_the_consumers_whole_number_check_decides_as_check_event(
    rates: tuple[Decimal, ...],
    tokens: tuple[int, int, int, int],
    upstream: Decimal,
    nudge: str | None,
) -> None:
    price = new_price(
        "openai",
        "gpt-4o-mini",
        T0,
        input=rates[0],
        cached_input=rates[1],
        output=rates[2],
        reasoning=rates[3],
        request_fee_usd=rates[4],
    )
    input_tokens, cached, output_tokens, reasoning = tokens
    fields = {
        "input_tokens": input_tokens,
        "cached_input_tokens": cached,
        "output_tokens": output_tokens,
        "reasoning_tokens": reasoning,
    }

    def reference_for(upstream: Decimal) -> DriftCheck:
        return check_event(
            price.pair,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached,
            reasoning_tokens=reasoning,
            upstream_usd=upstream,
            price=price,
        )

    reference = reference_for(upstream)
    if nudge is not None and reference.list_usd is not None:
        # Right at the tolerance's edge, where a rounding slip would show.
        limit = max(reference.list_usd * DEFAULT_TOLERANCE, ABSOLUTE_FLOOR_USD)
        step = Decimal("1e-30") if nudge == "just beyond" else 0
        upstream = reference.list_usd + limit + step
        reference = reference_for(upstream)
    row = _row(upstream, T0 + timedelta(days=1), **fields)
    counter = price_drift_counter(CollectorRegistry())
    assert count_drift([row], {price.pair: [price]}, counter) == int(reference.beyond)
