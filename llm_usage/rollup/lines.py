"""Invoice lines from exact monthly totals: pure functions, no I/O (docs/contract.md, "Invoice
lines").

Money is summed exactly and rounded once, half up, per line. A late event for a closed month is
billed as a true-up: what the month's exact total rounds to now, minus what was already billed
for it, so that the lines billing any (tenant, deployment, month) always add up to
round_half_up(its exact total * 100).

A month with a period charge (plan-inclusive) bills exactly that charge instead: its usage line
as usual plus a true-up line to round_half_up(period charge * 100), and after close the
adjustments true up to that amount too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from llm_usage.domain.invoices import (
    ADJUSTMENT_KIND,
    PLAN_TRUE_UP_KIND,
    USAGE_KIND,
    InvoiceLine,
)
from llm_usage.domain.money import canonical_decimal, usd_to_cents
from llm_usage.domain.period_charges import LineKey, PeriodCharge
from llm_usage.domain.usage import Usage

# The line's meta key for the part of its charge the price table estimated.
ESTIMATED_META = "estimated_charge_usd"


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
            **estimated_meta(usage),
        },
    )


def estimated_meta(usage: Usage) -> dict[str, str]:
    """How much of the line's exact charge the price table estimated (a string), when any."""
    if not usage.estimated_charge_usd:
        return {}
    return {ESTIMATED_META: canonical_decimal(usage.estimated_charge_usd)}


def usage_lines(
    tenant_id: str, period: str, usage_by_deployment: Mapping[str | None, Usage]
) -> list[InvoiceLine]:
    """One line per deployment, 0-cent lines left out, in a stable order (null first)."""
    lines = [
        usage_line(tenant_id, period, deployment_id, usage)
        for deployment_id, usage in sorted(
            usage_by_deployment.items(), key=lambda item: line_order((tenant_id, item[0]))
        )
    ]
    return [line for line in lines if line.amount_cents != 0]


def period_charge_meta(charge: PeriodCharge) -> dict[str, str]:
    """What a line billing a period charge says of it: its id and exact amount (a string)."""
    return {
        "period_charge_id": charge.period_charge_id,
        "period_charge_usd": str(charge.period_charge_usd),
    }


def plan_true_up_line(
    *, period: str, usage_line_cents: int, charge: PeriodCharge
) -> InvoiceLine | None:
    """The line that makes a month with a period charge bill exactly that charge: its cents
    minus what the usage line bills (negative when usage came to more); None at 0 cents."""
    amount = usd_to_cents(charge.period_charge_usd) - usage_line_cents
    if amount == 0:
        return None
    return InvoiceLine(
        tenant_id=charge.tenant_id,
        period=period,
        deployment_id=charge.deployment_id,
        kind=PLAN_TRUE_UP_KIND,
        qty=0,
        amount_cents=amount,
        description=(
            f"Plan-inclusive true-up to the period charge of {charge.period_charge_usd} USD"
        ),
        meta=period_charge_meta(charge),
    )


def plan_true_up_lines(
    period: str, lines: Iterable[InvoiceLine], charges: Mapping[LineKey, PeriodCharge]
) -> list[InvoiceLine]:
    """The month's true-ups, one per (tenant, deployment) with a period charge, against the
    month's usage `lines` (a deployment without one bills 0 cents of usage), in a stable order."""
    usage_cents = {
        (line.tenant_id, line.deployment_id): line.amount_cents
        for line in lines
        if line.kind == USAGE_KIND
    }
    true_ups = (
        plan_true_up_line(
            period=period, usage_line_cents=usage_cents.get(key, 0), charge=charges[key]
        )
        for key in sorted(charges, key=line_order)
    )
    return [line for line in true_ups if line is not None]


def line_order(key: LineKey) -> tuple[str, bool, str]:
    """(tenant, deployment) in the order lines are listed: null deployment first."""
    return (key[0], key[1] is not None, key[1] or "")


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
    period_charge: PeriodCharge | None = None,
    correction_ids: Sequence[str] = (),
) -> InvoiceLine | None:
    """The true-up billed in `period` for late events (or a superseding period charge) of the
    closed `original_period`, or None when it comes to 0 cents. Its amount makes every line
    billing the original month add up to round_half_up(its period charge * 100) when it has
    one, else to round_half_up(its exact total now * 100); its qty and meta are the late
    events' own (and the period charge it trues up to), negative when corrections took usage
    away; `correction_ids` names the late corrections it trues up."""
    target = total_now.charge_usd if period_charge is None else period_charge.period_charge_usd
    amount = usd_to_cents(target) - billed.cents
    if amount == 0:
        return None
    late = total_now - billed.usage
    charge_meta = {} if period_charge is None else period_charge_meta(period_charge)
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
            **estimated_meta(late),
            **charge_meta,
            **({"correction_ids": sorted(correction_ids)} if correction_ids else {}),
        },
    )


def adjustment_lines(
    *,
    period: str,
    original_period: str,
    totals: Mapping[LineKey, Usage],
    billed: Mapping[tuple[str, str | None, str], Billed],
    charges: Mapping[LineKey, PeriodCharge],
    corrections: Mapping[LineKey, Sequence[str]] | None = None,
) -> list[InvoiceLine]:
    """The true-ups billed in `period` for the closed `original_period`, one per (tenant,
    deployment) with usage now, billed lines or a period charge (0-cent ones left out), in line
    order: `totals` and `charges` of the month, `billed` as `billed_so_far` gives it, and the
    late corrections each trues up."""
    keys = totals.keys() | {(t, d) for t, d, m in billed if m == original_period} | charges.keys()
    lines = (
        adjustment_line(
            tenant_id=tenant,
            period=period,
            deployment_id=deployment,
            original_period=original_period,
            total_now=totals.get((tenant, deployment), Usage()),
            billed=billed.get((tenant, deployment, original_period), Billed()),
            period_charge=charges.get((tenant, deployment)),
            correction_ids=(corrections or {}).get((tenant, deployment), ()),
        )
        for tenant, deployment in sorted(keys, key=line_order)
    )
    return [line for line in lines if line is not None]


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
            Decimal(str(line.meta.get(ESTIMATED_META, 0))),
        )
        billed[key] = Billed(before.cents + line.amount_cents, before.usage + usage)
    return billed
