"""What a batch of counted events adds to the counters that matter: pure, in the events' order.

Inside a batch a counter is a plain `SpendKey` tuple, not a `CounterKey`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Protocol

from llm_usage.consumers.budget.crossing import Contribution
from llm_usage.domain.budgets import SCOPE_FIELDS, BudgetWindow, ScopeType, SpendKey, period_start
from llm_usage.domain.corrections import Effective
from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.domain.periods import month_end, utc_day
from llm_usage.storage.budget_spend import ChargeMove

_TENANT = ScopeType.TENANT.value
_DAILY = BudgetWindow.DAILY.value
_FIELD_OF_SCOPE = {scope_type.value: field for scope_type, field in SCOPE_FIELDS}


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


def contributions_to(
    counters: Iterable[SpendKey], events: Iterable[CountedEvent]
) -> dict[SpendKey, list[Contribution]]:
    """For each of `counters`, the charges of the `events` that add to it, in the events' order.

    An event adds to the counters of every scope it names (`SCOPE_FIELDS`) for its own UTC day and
    month (a backdated event to its own period). Only the counters asked for are looked at: a
    batch touches thousands of counters, and only the handful that cross a level need this.
    """
    found: dict[SpendKey, list[Contribution]] = {}
    # Per tenant: the event field naming the scope (None for the tenant itself), the scope id,
    # the period's first and last day, and where its contributions go.
    wanted: dict[str, list[tuple[str | None, str, date, date, list[Contribution]]]] = {}
    for key in counters:
        tenant, scope_type, scope_id, window, start = key
        contributions = found[key] = []
        field = None if scope_type == _TENANT else _FIELD_OF_SCOPE[scope_type]
        last = start if window == _DAILY else month_end(start)
        wanted.setdefault(tenant, []).append((field, scope_id, start, last, contributions))
    # The bench's backlog asks for ~450 counters a batch over most of its tenants: this loop runs
    # for most events, so it allocates nothing for an event that adds to none of them.
    for event in events:
        of_tenant = wanted.get(event.tenant_id)
        if of_tenant is None:
            continue
        occurred = event.occurred_at
        if occurred.tzinfo is not UTC:  # decoding gives UTC already
            occurred = occurred.astimezone(UTC)
        day = occurred.date()
        contribution = None
        for field, scope_id, first, last, contributions in of_tenant:
            if first <= day <= last and (field is None or getattr(event, field) == scope_id):
                if contribution is None:
                    contribution = Contribution(event.gateway_request_id, event.customer_charge_usd)
                contributions.append(contribution)
    return found


def correction_moves(
    gateway_request_id: str,
    tenant_id: str,
    occurred_at: datetime,
    before: Effective,
    after: Effective,
) -> list[ChargeMove]:
    """What a correction moves on the counters, as signed charges of its event: the effective
    charge before it taken back and the one after it added; one move of the difference when the
    attribution stays; no charge of 0, so nothing when the counters see no change. Their
    counters add up to `spend_contribution(after) - spend_contribution(before)` (PostgreSQL
    expands them)."""
    old = None if before.voided else (before.deployment_id, before.user_id, before.agent_id)
    new = None if after.voided else (after.deployment_id, after.user_id, after.agent_id)
    if old is not None and old == new:
        change = EXACT_CONTEXT.subtract(after.customer_charge_usd, before.customer_charge_usd)
        if not change:
            return []
        return [ChargeMove(gateway_request_id, tenant_id, *new, occurred_at, change)]
    moves: list[ChargeMove] = []
    if old is not None and before.customer_charge_usd:
        taken = EXACT_CONTEXT.minus(before.customer_charge_usd)
        moves.append(ChargeMove(gateway_request_id, tenant_id, *old, occurred_at, taken))
    if new is not None and after.customer_charge_usd:
        moves.append(
            ChargeMove(gateway_request_id, tenant_id, *new, occurred_at, after.customer_charge_usd)
        )
    return moves


def spend_contribution(
    tenant_id: str, occurred_at: datetime, event: Effective, *, horizon: date
) -> dict[SpendKey, Decimal]:
    """What an event with these effective values adds to the counters: its charge to every scope
    it names (`SCOPE_FIELDS`: the tenant, each attribution that is not null) in its own UTC day
    and month. Nothing when it is voided, or its day is before the budget `horizon` (such days
    count in no period). The rule the counters' expansion in PostgreSQL
    (storage/budget_spend.py) and `correction_moves` are tested against."""
    if event.voided or utc_day(occurred_at) < horizon:
        return {}
    scopes = [
        (scope_type.value, tenant_id if field == "tenant_id" else getattr(event, field))
        for scope_type, field in SCOPE_FIELDS
    ]
    return {
        (tenant_id, scope_type, scope_id, window.value, period_start(window, occurred_at)): (
            event.customer_charge_usd
        )
        for scope_type, scope_id in scopes
        if scope_id is not None
        for window in BudgetWindow
    }
