"""What a batch of counted events adds to which counters: pure, in the events' order.

Inside a batch a counter is a plain `SpendKey` tuple, not a `CounterKey`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Protocol

from llm_usage.consumers.budget.crossing import Contribution
from llm_usage.schemas.budget import BudgetWindow, ScopeType, SpendKey

_TENANT = ScopeType.TENANT.value
_DAILY = BudgetWindow.DAILY.value
_MONTHLY = BudgetWindow.MONTHLY.value
_ATTRIBUTIONS = (
    (ScopeType.DEPLOYMENT.value, "deployment_id"),
    (ScopeType.USER.value, "user_id"),
    (ScopeType.AGENT.value, "agent_id"),
)


class CountedEvent(Protocol):
    """What counting reads of a decoded usage event."""

    @property
    def gateway_request_id(self) -> str: ...
    @property
    def tenant_id(self) -> str: ...
    @property
    def deployment_id(self) -> str | None: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def agent_id(self) -> str | None: ...
    @property
    def customer_charge_usd(self) -> Decimal: ...
    @property
    def occurred_at(self) -> datetime: ...


def scopes_of(event: CountedEvent) -> list[tuple[str, str]]:
    """Every scope an event counts toward: its tenant, and each attribution that is not null."""
    scopes = [(_TENANT, event.tenant_id)]
    for scope_type, field in _ATTRIBUTIONS:
        value = getattr(event, field)
        if value is not None:
            scopes.append((scope_type, value))
    return scopes


def contributions_by_counter(
    events: Iterable[CountedEvent],
) -> dict[SpendKey, list[Contribution]]:
    """For every counter the events touch, their charges in the events' order. Each event
    counts toward its own UTC day and month (a backdated event toward its own period)."""
    counters: dict[SpendKey, list[Contribution]] = {}
    months: dict[date, date] = {}
    for event in events:
        contribution = Contribution(event.gateway_request_id, event.customer_charge_usd)
        day = event.occurred_at.astimezone(UTC).date()
        month = months.get(day)
        if month is None:
            month = months[day] = day.replace(day=1)
        tenant = event.tenant_id
        for scope_type, scope_id in scopes_of(event):
            for key in (
                (tenant, scope_type, scope_id, _DAILY, day),
                (tenant, scope_type, scope_id, _MONTHLY, month),
            ):
                found = counters.get(key)
                if found is None:
                    counters[key] = [contribution]
                else:
                    found.append(contribution)
    return counters
