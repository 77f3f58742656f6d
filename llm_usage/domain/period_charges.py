"""Period charges: the gateway's authoritative charge for a tenant's (and deployment's) month on
a plan-inclusive plan, and which one is in effect when several were sent."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

# What a copy under a known (tenant, id) must repeat to be a plain duplicate.
CONFLICT_FIELDS: tuple[str, ...] = (
    "tenant_id",
    "deployment_id",
    "period",
    "period_charge_usd",
    "occurred_at",
)
_CONFLICT_VALUES = operator.attrgetter(*CONFLICT_FIELDS)

# (tenant_id, deployment_id): the invoice line a period charge trues up.
LineKey = tuple[str, str | None]


@dataclass(frozen=True, slots=True)
class PeriodCharge:
    """One period charge as stored: `occurred_at` in UTC, the charge exact."""

    tenant_id: str
    period_charge_id: str
    deployment_id: str | None
    period: str  # YYYY-MM
    period_charge_usd: Decimal
    occurred_at: datetime


def differing_fields(stored: PeriodCharge, incoming: PeriodCharge) -> list[str]:
    """The conflict fields whose values differ (decimals by value, times as instants)."""
    return [
        name
        for name, was, now in zip(
            CONFLICT_FIELDS, _CONFLICT_VALUES(stored), _CONFLICT_VALUES(incoming), strict=True
        )
        if was != now
    ]


def supersedes(later: PeriodCharge, earlier: PeriodCharge) -> bool:
    """Whether `later` replaces `earlier`: a later `occurred_at`, or the same and a greater id."""
    return (later.occurred_at, later.period_charge_id) > (
        earlier.occurred_at,
        earlier.period_charge_id,
    )


def effective_period_charges(charges: Iterable[PeriodCharge]) -> dict[LineKey, PeriodCharge]:
    """The charge in effect per (tenant, deployment), of charges for one month."""
    effective: dict[LineKey, PeriodCharge] = {}
    for charge in charges:
        key = (charge.tenant_id, charge.deployment_id)
        found = effective.get(key)
        if found is None or supersedes(charge, found):
            effective[key] = charge
    return effective
