"""Exact sums for the tests' expected totals (the product sums money in PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal, localcontext

from llm_usage.domain.money import EXACT_CONTEXT


def exact_sum(values: Iterable[Decimal]) -> Decimal:
    """Every digit kept (0 when empty): EXACT_CONTEXT raises `decimal.Inexact` rather than round."""
    with localcontext(EXACT_CONTEXT):
        return sum(values, Decimal(0))
