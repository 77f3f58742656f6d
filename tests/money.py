"""Exact sums for the tests' expected totals (the product sums money in PostgreSQL), and the
decimals a money field can hold, for hypothesis."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal, localcontext

from hypothesis import strategies as st

from llm_usage.domain.money import EXACT_CONTEXT

# Every value a decimal field of the usage event can carry: 12 digits before the point, 18 after.
EVENT_DECIMALS = st.decimals(
    min_value=Decimal(0),
    max_value=Decimal("999999999999.999999999999999999"),
    places=18,
    allow_nan=False,
    allow_infinity=False,
)


def exact_sum(values: Iterable[Decimal]) -> Decimal:
    """Every digit kept (0 when empty): EXACT_CONTEXT raises `decimal.Inexact` rather than round."""
    with localcontext(EXACT_CONTEXT):
        return sum(values, Decimal(0))
