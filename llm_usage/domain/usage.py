"""Exact usage totals: the one value for "how much of what" over some events, wherever it is
summed (a day's pre-aggregate, a month per deployment, the part of a month already billed)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from llm_usage.domain.money import EXACT_CONTEXT


@dataclass(frozen=True)
class Usage:
    """Exact totals of some events: a (tenant, deployment, month)'s, or the part of it billed."""

    charge_usd: Decimal = Decimal(0)
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    # The part of `charge_usd` the price table estimated (the gateway sent no charge).
    estimated_charge_usd: Decimal = Decimal(0)

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            EXACT_CONTEXT.add(self.charge_usd, other.charge_usd),
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.requests + other.requests,
            EXACT_CONTEXT.add(self.estimated_charge_usd, other.estimated_charge_usd),
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            EXACT_CONTEXT.subtract(self.charge_usd, other.charge_usd),
            self.input_tokens - other.input_tokens,
            self.output_tokens - other.output_tokens,
            self.requests - other.requests,
            EXACT_CONTEXT.subtract(self.estimated_charge_usd, other.estimated_charge_usd),
        )
