"""Exact money: half-up rounding, cents and dollars, sums that never lose a digit."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal, getcontext, localcontext
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_usage.domain.money import cents_to_usd, round_half_up, usd_to_cents
from tests.money import EVENT_DECIMALS, exact_sum


def half_up_cents(usd: Decimal) -> int:
    """The reference: floor(usd * 100 + 1/2) over exact fractions, for usd >= 0."""
    return math.floor(Fraction(usd) * 100 + Fraction(1, 2))


@pytest.mark.parametrize(
    ("value", "places", "expected"),
    [
        ("2.5", 0, "3"),
        ("3.5", 0, "4"),
        ("2.4999999999999999", 0, "2"),
        ("-2.5", 0, "-3"),
        ("0.125", 2, "0.13"),
        ("0.135", 2, "0.14"),
        ("1.005", 2, "1.01"),
        ("0.0049999999999", 2, "0.00"),
        ("2", 2, "2.00"),
        ("0.000000000000000005", 17, "0.00000000000000001"),
        ("999999999999.999999999999999999", 18, "999999999999.999999999999999999"),
        ("999999999999.995", 2, "1000000000000.00"),
        ("125", -1, "1.3E+2"),
    ],
)
def test_round_half_up_rounds_halves_away_from_zero_to_exactly_the_places_asked(
    value: str, places: int, expected: str
) -> None:
    rounded = round_half_up(Decimal(value), places)
    assert rounded == Decimal(expected)
    assert rounded.as_tuple().exponent == -places


def test_round_half_up_ignores_the_ambient_decimal_context() -> None:
    with localcontext() as ambient:
        ambient.prec = 3
        ambient.rounding = "ROUND_HALF_EVEN"
        assert round_half_up(Decimal("12345.125"), 2) == Decimal("12345.13")
    assert getcontext().prec >= 28


@pytest.mark.parametrize(
    ("usd", "cents"),
    [
        ("0", 0),
        ("0.004999999999999999", 0),
        ("0.005", 1),
        ("0.005000000000000000", 1),
        ("0.015", 2),
        ("0.0054", 1),
        ("0.125", 13),
        ("1", 100),
        ("1.00", 100),
        ("12345678901.234567891", 1234567890123),
        ("999999999999.994999999999999999", 99999999999999),
        ("999999999999.995", 100000000000000),
        ("1E+2", 10000),
    ],
)
def test_usd_to_cents_rounds_usd_times_100_half_up_once(usd: str, cents: int) -> None:
    assert usd_to_cents(Decimal(usd)) == cents


@pytest.mark.parametrize(
    ("cents", "usd"),
    [(0, "0.00"), (5, "0.05"), (50, "0.50"), (100, "1.00"), (99999999999999, "999999999999.99")],
)
def test_cents_to_usd_is_exact_with_two_places(cents: int, usd: str) -> None:
    assert str(cents_to_usd(cents)) == usd


@pytest.mark.parametrize(
    "call",
    [
        lambda: round_half_up(0.5),  # type: ignore[arg-type]
        lambda: usd_to_cents(0.1),  # type: ignore[arg-type]
        lambda: cents_to_usd(5.0),  # type: ignore[arg-type]
        lambda: cents_to_usd(True),
    ],
    ids=["round_half_up", "usd_to_cents", "cents_to_usd", "cents_to_usd bool"],
)
def test_money_functions_refuse_floats_and_booleans(call: Callable[[], object]) -> None:
    with pytest.raises(TypeError):
        call()


@pytest.mark.parametrize("value", ["NaN", "sNaN", "Infinity", "-Infinity"])
def test_money_functions_refuse_non_finite_values(value: str) -> None:
    with pytest.raises(ValueError, match="finite"):
        usd_to_cents(Decimal(value))
    with pytest.raises(ValueError, match="finite"):
        round_half_up(Decimal(value), 2)


@given(st.integers(min_value=-(10**20), max_value=10**20))
def test_cents_survive_a_round_trip_through_usd(cents: int) -> None:
    assert usd_to_cents(cents_to_usd(cents)) == cents


@given(EVENT_DECIMALS)
def test_usd_to_cents_matches_exact_half_up_arithmetic(usd: Decimal) -> None:
    assert usd_to_cents(usd) == half_up_cents(usd)


@given(EVENT_DECIMALS, st.integers(min_value=0, max_value=18))
def test_round_half_up_is_within_half_a_unit_and_idempotent(value: Decimal, places: int) -> None:
    rounded = round_half_up(value, places)
    assert abs(Fraction(rounded) - Fraction(value)) <= Fraction(1, 2 * 10**places)
    assert round_half_up(rounded, places) == rounded


@settings(deadline=None)  # exact Fraction arithmetic on 200 values is slow on a busy machine
@given(st.lists(EVENT_DECIMALS, max_size=200))
def test_rounding_an_exact_sum_once_stays_within_half_a_cent(values: list[Decimal]) -> None:
    total = exact_sum(values)
    assert abs(usd_to_cents(total) - Fraction(total) * 100) <= Fraction(1, 2)
    assert usd_to_cents(total) == half_up_cents(total)


def test_rounding_the_exact_sum_once_differs_from_summing_rounded_cents() -> None:
    charges = [Decimal("0.005")] * 3
    assert usd_to_cents(exact_sum(charges)) == 2  # 0.015 USD
    assert sum(usd_to_cents(charge) for charge in charges) == 3
