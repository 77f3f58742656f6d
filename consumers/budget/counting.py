"""What a batch of counted events adds to which counters: pure, in the events' order."""

from __future__ import annotations

from collections.abc import Iterable

from llm_usage.consumers.budget.crossing import Contribution
from llm_usage.schemas.budget import BudgetWindow, CounterKey, ScopeType, period_start
from llm_usage.schemas.usage_event import UsageEvent


def scopes_of(event: UsageEvent) -> list[tuple[ScopeType, str]]:
    """Every scope an event counts toward: its tenant, and each attribution that is not null."""
    scopes = [(ScopeType.TENANT, event.tenant_id)]
    for scope_type, value in (
        (ScopeType.DEPLOYMENT, event.deployment_id),
        (ScopeType.USER, event.user_id),
        (ScopeType.AGENT, event.agent_id),
    ):
        if value is not None:
            scopes.append((scope_type, value))
    return scopes


def contributions_by_counter(
    events: Iterable[UsageEvent],
) -> dict[CounterKey, list[Contribution]]:
    """For every counter the events touch, their charges in the events' order. Each event
    counts toward its own UTC day and month (a backdated event toward its own period)."""
    counters: dict[CounterKey, list[Contribution]] = {}
    for event in events:
        contribution = Contribution(event.gateway_request_id, event.customer_charge_usd)
        periods = [(window, period_start(window, event.occurred_at)) for window in BudgetWindow]
        for scope_type, scope_id in scopes_of(event):
            for window, start in periods:
                key = CounterKey(event.tenant_id, scope_type, scope_id, window, start)
                counters.setdefault(key, []).append(contribution)
    return counters
