"""The answer of `POST /v1/budget-checks` (beside `api/models.py`, whose conventions it follows:
money an exact decimal string, times RFC 3339 in UTC with `Z`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llm_usage.api.event_models import TimeText
from llm_usage.api.models import Money, UsdText, _Answer


class DeniedLimitAnswer(_Answer):
    """A blocking limit the check would have broken, with what the check saw on it."""

    scope_type: Literal["tenant", "deployment", "user", "agent"]
    scope_id: str
    window: Literal["daily", "monthly"]
    limit_usd: UsdText = Money()
    spend_usd: UsdText = Money("the spend counted in the period when the check ran")
    held_usd: UsdText = Money("the open holds of other requests on this limit")


class BudgetCheckAnswer(_Answer):
    """Allow (the estimate is held on every scope and period the request's event will count
    toward) or deny (nothing is held). A repeated id answers this same answer."""

    decision: Literal["allow", "deny"]
    denied_by: list[DeniedLimitAnswer] = Field(
        description="for a deny, each blocking limit it would break: scope type in the "
        "order tenant, deployment, user, agent, then daily before monthly; empty for an allow"
    )
    hold_expires_at: TimeText | None = Field(
        description="when the hold ends unless the request's usage event is counted first; null "
        "for a deny and for a request whose event is already counted (nothing is held)"
    )
    estimated_charge_usd: UsdText = Money(
        "the amount held (or that would have been): the charge sent, or the tokens priced"
    )
