"""An invoice line: what the rollup computes, storage keeps and the API and `rollup run --json`
show, as one value."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

USAGE_KIND = "llm_usage"
ADJUSTMENT_KIND = "llm_usage_adjustment"
PLAN_TRUE_UP_KIND = "llm_usage_plan_true_up"
RESOURCE_KIND = "llm_tokens"
UNIT = "token"


@dataclass(frozen=True)
class InvoiceLine:
    """One line as stored and as `rollup run --json` prints it."""

    tenant_id: str
    period: str  # YYYY-MM, the month the line is billed in
    deployment_id: str | None
    kind: str
    qty: int
    amount_cents: int
    description: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    closed: bool = False
    resource_kind: str = RESOURCE_KIND
    unit: str = UNIT
    unit_price_cents: int | None = None

    @property
    def original_period(self) -> str:
        """The month this line bills: its own, or the one an adjustment trues up."""
        return str(self.meta.get("original_period", self.period))

    def as_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "period": self.period,
            "deployment_id": self.deployment_id,
            "kind": self.kind,
            "resource_kind": self.resource_kind,
            "unit": self.unit,
            "unit_price_cents": self.unit_price_cents,
            "qty": self.qty,
            "amount_cents": self.amount_cents,
            "description": self.description,
            "meta": dict(self.meta),
            "closed": self.closed,
        }
