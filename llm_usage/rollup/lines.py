"""Invoice lines from exact monthly totals: pure functions, no I/O (docs/contract.md, "Invoice
lines").

Money is summed exactly and rounded once, half up, per line. A late event for a closed month is
billed as a true-up: what the month's exact total rounds to now, minus what was already billed
for it, so that the lines billing any (tenant, deployment, month) always add up to
round_half_up(its exact total * 100).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from llm_usage.domain.invoices import ADJUSTMENT_KIND, USAGE_KIND, InvoiceLine
from llm_usage.domain.money import usd_to_cents
from llm_usage.domain.usage import Usage


def usage_description(usage: Usage) -> str:
    return (
        f"LLM tokens \u2014 {usage.input_tokens} in / {usage.output_tokens} out "
        f"({usage.requests} requests)"
    )


def usage_line(tenant_id: str, period: str, deployment_id: str | None, usage: Usage) -> InvoiceLine:
    """The month's line for one deployment (null is its own deployment)."""
    return InvoiceLine(
        tenant_id=tenant_id,
        period=period,
        deployment_id=deployment_id,
        kind=USAGE_KIND,
        qty=usage.input_tokens + usage.output_tokens,
        amount_cents=usd_to_cents(usage.charge_usd),
        description=usage_description(usage),
        meta={
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "requests": usage.requests,
        },
    )


def usage_lines(
    tenant_id: str, period: str, usage_by_deployment: Mapping[str | None, Usage]
) -> list[InvoiceLine]:
    """One line per deployment, 0-cent lines left out, in a stable order (null first)."""
    lines = [
        usage_line(tenant_id, period, deployment_id, usage)
        for deployment_id, usage in sorted(
            usage_by_deployment.items(), key=lambda item: (item[0] is not None, item[0] or "")
        )
    ]
    return [line for line in lines if line.amount_cents != 0]


@dataclass(frozen=True)
class Billed:
    """What the lines of closed months already billed for one (tenant, deployment, month)."""

    cents: int = 0
    usage: Usage = field(default_factory=Usage)


def adjustment_line(
    *,
    tenant_id: str,
    period: str,
    deployment_id: str | None,
    original_period: str,
    total_now: Usage,
    billed: Billed,
) -> InvoiceLine | None:
    """The true-up billed in `period` for late events of the closed `original_period`, or None
    when it comes to 0 cents. Its amount makes every line billing the original month add up to
    round_half_up(its exact total now * 100); its qty and meta are the late events' own."""
    amount = usd_to_cents(total_now.charge_usd) - billed.cents
    if amount == 0:
        return None
    late = total_now - billed.usage
    return InvoiceLine(
        tenant_id=tenant_id,
        period=period,
        deployment_id=deployment_id,
        kind=ADJUSTMENT_KIND,
        qty=late.input_tokens + late.output_tokens,
        amount_cents=amount,
        description=f"{usage_description(late)} \u2014 adjustment for {original_period}",
        meta={
            "input_tokens": late.input_tokens,
            "output_tokens": late.output_tokens,
            "requests": late.requests,
            "original_period": original_period,
        },
    )


def billed_so_far(lines: Iterable[InvoiceLine]) -> dict[tuple[str, str | None, str], Billed]:
    """For each (tenant, deployment, original month): the cents and usage its lines billed."""
    billed: dict[tuple[str, str | None, str], Billed] = {}
    for line in lines:
        key = (line.tenant_id, line.deployment_id, line.original_period)
        before = billed.get(key, Billed())
        usage = Usage(
            Decimal(0),
            int(line.meta.get("input_tokens", 0)),
            int(line.meta.get("output_tokens", 0)),
            int(line.meta.get("requests", 0)),
        )
        billed[key] = Billed(before.cents + line.amount_cents, before.usage + usage)
    return billed
