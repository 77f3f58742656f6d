"""`prices preview`: what a month's invoice lines would be under the price table in effect now,
beside what was billed. Pure functions over exact decimals.

An event costs a linear function of its token counts (domain/prices.py), so the exact sum over
a group of events priced by one row is that row's cost of the group's summed tokens plus one fee
per event: the storage sums tokens per (tenant, deployment, provider, model) and this module
prices the sums. Events no row can price keep the charge they were billed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal

from llm_usage.domain.invoices import USAGE_KIND, InvoiceLine
from llm_usage.domain.money import EXACT_CONTEXT, usd_to_cents
from llm_usage.domain.prices import Price, cost_usd

# (tenant_id, deployment_id): what one usage line bills.
LineKey = tuple[str, str | None]


@dataclass(frozen=True)
class PairUsage:
    """A month's events of one tenant, deployment, provider and model: the summed tokens of those
    whose counts can be priced (cached ≤ input, reasoning ≤ output), and the billed charges."""

    tenant_id: str
    deployment_id: str | None
    provider: str | None
    model: str | None
    events: int
    charge_usd: Decimal
    priceable_events: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    unpriceable_charge_usd: Decimal


def cost_of_events(price: Price, usage: PairUsage) -> Decimal:
    """The exact sum of what each priceable event of `usage` costs under `price`."""
    exact = EXACT_CONTEXT
    tokens = cost_usd(
        replace(price, request_fee_usd=Decimal(0)),
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )
    return exact.add(tokens, exact.multiply(Decimal(usage.priceable_events), price.request_fee_usd))


@dataclass(frozen=True)
class PreviewLine:
    """One (tenant, deployment) of the month: the cents its usage line billed (0 when the line
    was left out at 0 cents), the cents the same events come to under today's table, and how
    many events kept their billed charge (no row in effect now for their pair)."""

    tenant_id: str
    deployment_id: str | None
    billed_cents: int
    preview_usd: Decimal
    events: int
    kept_events: int

    @property
    def preview_cents(self) -> int:
        return usd_to_cents(self.preview_usd)

    @property
    def difference_cents(self) -> int:
        return self.preview_cents - self.billed_cents


def preview_lines(
    period: str,
    billed: Iterable[InvoiceLine],
    usage: Iterable[PairUsage],
    prices_now: Mapping[tuple[str, str], Price],
) -> list[PreviewLine]:
    """Each usage line of `period` (and each deployment whose line was left out at 0 cents)
    beside its cents under `prices_now`, the row in effect now per (provider, model); in the
    rollup's order (tenant, then deployment with null first). Adjustment lines, which bill
    other months, are not previewed."""
    exact = EXACT_CONTEXT
    billed_cents: dict[LineKey, int] = {}
    for line in billed:
        if line.kind == USAGE_KIND and line.original_period == period:
            key = (line.tenant_id, line.deployment_id)
            billed_cents[key] = billed_cents.get(key, 0) + line.amount_cents
    totals: dict[LineKey, tuple[Decimal, int, int]] = {}
    for group in usage:
        price = (
            prices_now.get((group.provider, group.model))
            if group.provider is not None and group.model is not None
            else None
        )
        if price is None:
            amount, kept = group.charge_usd, group.events
        else:
            amount = exact.add(cost_of_events(price, group), group.unpriceable_charge_usd)
            kept = group.events - group.priceable_events
        key = (group.tenant_id, group.deployment_id)
        before = totals.get(key, (Decimal(0), 0, 0))
        totals[key] = (exact.add(before[0], amount), before[1] + group.events, before[2] + kept)
    return [
        PreviewLine(
            tenant_id,
            deployment_id,
            billed_cents.get((tenant_id, deployment_id), 0),
            *totals.get((tenant_id, deployment_id), (Decimal(0), 0, 0)),
        )
        for tenant_id, deployment_id in sorted(
            billed_cents.keys() | totals.keys(),
            key=lambda key: (key[0], key[1] is not None, key[1] or ""),
        )
    ]
