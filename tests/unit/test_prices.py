"""The price table's rules: the exact cost of a request, the row in effect, the changes allowed."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_usage.domain.prices import (
    PRICE_CHANGE_LEAD,
    Price,
    UnpriceableTokensError,
    cost_usd,
    in_effect,
    new_price,
    refusal_of_new_price,
)
from tests import clock
from tests.money import EVENT_DECIMALS

NOW = clock.now()
MICROSECOND = timedelta(microseconds=1)
# USD per million: input 3, cached 0.3, output 15, reasoning 12, fee 0.001 per request.
FULL = new_price(
    "anthropic",
    "claude",
    NOW,
    input=Decimal(3),
    cached_input=Decimal("0.3"),
    output=Decimal(15),
    reasoning=Decimal(12),
    request_fee_usd=Decimal("0.001"),
)
DEFAULTS = new_price("openai", "gpt-4o", NOW, input=Decimal("2.5"), output=Decimal(10))


def cost_of(price: Price, tokens: tuple[int, int, int, int]) -> Decimal:
    """`cost_usd` of (input, output, cached input, reasoning) tokens."""
    input_tokens, output_tokens, cached, reasoning = tokens
    return cost_usd(
        price,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached,
        reasoning_tokens=reasoning,
    )


def test_new_price_defaults_cached_to_input_reasoning_to_output_and_no_fee() -> None:
    assert (DEFAULTS.cached_input, DEFAULTS.reasoning) == (Decimal("2.5"), Decimal(10))
    assert DEFAULTS.request_fee_usd == 0


@pytest.mark.parametrize(
    ("price", "tokens", "expected"),
    [
        (DEFAULTS, (0, 0, 0, 0), "0"),
        (DEFAULTS, (1_000_000, 0, 0, 0), "2.5"),
        (DEFAULTS, (0, 1_000_000, 0, 0), "10"),
        (DEFAULTS, (1, 1, 0, 0), "0.0000125"),
        # Defaults: cached input at the input price, reasoning at the output price.
        (DEFAULTS, (1000, 500, 1000, 500), "0.0075"),
        (DEFAULTS, (1000, 500, 400, 200), "0.0075"),
        # Cached and reasoning at 0: every token at the plain rates, plus the fee.
        (FULL, (1000, 500, 0, 0), "0.0115"),
        # All input cached, all output reasoning: only those rates, plus the fee.
        (FULL, (1000, 500, 1000, 500), "0.0073"),
        # Some of each: (600 * 3 + 400 * 0.3 + 300 * 15 + 200 * 12) / 10**6 + 0.001.
        (FULL, (1000, 500, 400, 200), "0.00982"),
        # A fee alone when no token was used.
        (FULL, (0, 0, 0, 0), "0.001"),
        (
            replace(FULL, input=Decimal("0.000000000000000001")),
            (1, 0, 0, 0),
            "0.001000000000000000000001",
        ),
    ],
)
def test_cost_usd_prices_each_kind_of_token_at_its_rate_exactly(
    price: Price, tokens: tuple[int, int, int, int], expected: str
) -> None:
    assert cost_of(price, tokens) == Decimal(expected)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ((10, 0, 11, 0), "cached_input_tokens (11) exceeds input_tokens (10)"),
        ((0, 5, 0, 6), "reasoning_tokens (6) exceeds output_tokens (5)"),
    ],
)
def test_tokens_that_contradict_the_convention_cannot_be_priced(
    tokens: tuple[int, int, int, int], message: str
) -> None:
    with pytest.raises(UnpriceableTokensError, match=f"^{re.escape(message)}$"):
        cost_of(FULL, tokens)


def rows_from(*offsets: timedelta) -> list[Price]:
    return [
        replace(DEFAULTS, effective_from=NOW + offset, input=Decimal(index))
        for index, offset in enumerate(offsets, start=1)
    ]


ROWS = rows_from(timedelta(0), timedelta(days=1), timedelta(days=2))


@pytest.mark.parametrize(
    ("at", "expected_input"),
    [
        (NOW - timedelta(days=365), None),
        (NOW - MICROSECOND, None),
        (NOW, 1),
        (NOW + MICROSECOND, 1),
        (NOW + timedelta(days=1) - MICROSECOND, 1),
        (NOW + timedelta(days=1), 2),
        (NOW + timedelta(days=2) - MICROSECOND, 2),
        (NOW + timedelta(days=2), 3),
        (NOW + timedelta(days=3650), 3),
    ],
)
def test_the_row_in_effect_is_the_latest_that_has_started(
    at: datetime, expected_input: int | None
) -> None:
    row = in_effect(ROWS, at)

    assert (None if row is None else row.input) == expected_input


def test_no_row_is_in_effect_for_a_pair_without_rows() -> None:
    assert in_effect([], NOW) is None


@pytest.mark.parametrize(
    ("effective_from", "existing", "refusal"),
    [
        # A pair's first row may start at any time, even in the past.
        (NOW - timedelta(days=400), [], None),
        (NOW, [], None),
        # Later rows start at least the lead from now, and after every existing row.
        (NOW + PRICE_CHANGE_LEAD, rows_from(-timedelta(days=1)), None),
        (
            NOW + PRICE_CHANGE_LEAD - MICROSECOND,
            rows_from(-timedelta(days=1)),
            "at least 10 minutes",
        ),
        (NOW, rows_from(-timedelta(days=1)), "at least 10 minutes from now"),
        (NOW - timedelta(days=2), rows_from(-timedelta(days=1)), "at least 10 minutes"),
        (NOW + timedelta(hours=2), rows_from(timedelta(hours=1)), None),
        (NOW + timedelta(hours=1), rows_from(timedelta(hours=1)), "already has a row from"),
        (
            NOW + timedelta(hours=1),
            rows_from(timedelta(0), timedelta(hours=3)),
            "must take effect after it",
        ),
    ],
)
def test_which_new_rows_are_allowed(
    effective_from: datetime, existing: list[Price], refusal: str | None
) -> None:
    new = replace(DEFAULTS, effective_from=effective_from)

    answer = refusal_of_new_price(new, existing, now=NOW)

    if refusal is None:
        assert answer is None
    else:
        assert answer is not None
        assert refusal in answer
        assert "openai/gpt-4o" in answer


@pytest.mark.parametrize(
    "field", ["input", "cached_input", "output", "reasoning", "request_fee_usd"]
)
@pytest.mark.parametrize("value", [Decimal("-0.000001"), Decimal("NaN"), Decimal("Infinity")])
def test_negative_or_non_finite_prices_are_refused_even_as_a_first_row(
    field: str, value: Decimal
) -> None:
    changes: dict[str, Any] = {field: value}
    new = replace(DEFAULTS, **changes)

    answer = refusal_of_new_price(new, [], now=NOW)

    assert answer is not None
    assert answer.startswith(f"{field} must be a decimal ≥ 0")


# Every price a row can hold: the same limits as the event's decimals.
PRICES = EVENT_DECIMALS
BIGINT = st.integers(min_value=0, max_value=2**63 - 1)


@st.composite
def token_counts(draw: st.DrawFn) -> tuple[int, int, int, int]:
    input_tokens, output_tokens = draw(BIGINT), draw(BIGINT)
    cached = draw(st.integers(min_value=0, max_value=input_tokens))
    reasoning = draw(st.integers(min_value=0, max_value=output_tokens))
    return input_tokens, output_tokens, cached, reasoning


@settings(deadline=None)  # exact arithmetic on 30-digit values is slow on a busy machine
@given(
    tokens=token_counts(),
    prices=st.tuples(PRICES, PRICES, PRICES, PRICES, PRICES),
    defaults=st.booleans(),
)
def test_the_cost_is_the_contract_formula_computed_independently_with_fractions(
    tokens: tuple[int, int, int, int],
    prices: tuple[Decimal, Decimal, Decimal, Decimal, Decimal],
    defaults: bool,
) -> None:
    input_tokens, output_tokens, cached, reasoning = tokens
    input_price, cached_price, output_price, reasoning_price, fee = prices
    price = new_price(
        "p",
        "m",
        NOW,
        input=input_price,
        output=output_price,
        cached_input=None if defaults else cached_price,
        reasoning=None if defaults else reasoning_price,
        request_fee_usd=None if defaults else fee,
    )
    if defaults:
        cached_price, reasoning_price, fee = input_price, output_price, Decimal(0)

    cost = cost_of(price, tokens)

    expected = (
        (input_tokens - cached) * Fraction(input_price)
        + cached * Fraction(cached_price)
        + (output_tokens - reasoning) * Fraction(output_price)
        + reasoning * Fraction(reasoning_price)
    ) / 10**6 + Fraction(fee)
    assert Fraction(cost) == expected
