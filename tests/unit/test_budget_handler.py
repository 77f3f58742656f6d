"""The budget handler's pure steps: what a batch adds to each counter, and the alerts it crosses."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal as D

from llm_usage.consumers.budget.crossing import Contribution
from llm_usage.consumers.budget.handler import alerts_crossed, increments_of
from llm_usage.schemas.budget import AlertLevel, ScopeType, SpendKey
from llm_usage.schemas.budget_policy import BudgetPolicy

MONTH = date(2026, 12, 1)
NOW = datetime(2026, 12, 2, tzinfo=UTC)
TENANT_MONTH: SpendKey = ("t1", "tenant", "t1", "monthly", MONTH)
TENANT_DAY: SpendKey = ("t1", "tenant", "t1", "daily", date(2026, 12, 2))
USER_MONTH: SpendKey = ("t1", "user", "u1", "monthly", MONTH)


def test_increments_are_exact_sums_of_each_counters_contributions() -> None:
    tiny = [Contribution(f"r{i}", D("0.0000000000000000001")) for i in range(3)]
    increments = increments_of({TENANT_MONTH: tiny, USER_MONTH: [Contribution("a", D("1.25"))]})
    assert increments == {TENANT_MONTH: D("0.0000000000000000003"), USER_MONTH: D("1.25")}


def test_alerts_are_crossed_by_the_first_event_reaching_each_level_of_a_counter_with_a_policy() -> (
    None
):
    contributions = {
        TENANT_MONTH: [
            Contribution("a", D("0.05")),
            Contribution("b", D("0.05")),
            Contribution("c", D("2.5")),
        ],
        TENANT_DAY: [Contribution("a", D("0.05"))],  # the policy has no daily limit
        USER_MONTH: [Contribution("a", D("100"))],  # no policy for this user
    }
    before = {TENANT_MONTH: D("7.9"), TENANT_DAY: D("0"), USER_MONTH: D("0")}
    policy = BudgetPolicy("t1", ScopeType.TENANT, "t1", monthly_limit_usd=D(10))
    alerts = alerts_crossed(contributions, before, {policy.key: policy}, emitted_at=NOW)
    assert [(a.level, a.spend_usd, a.triggered_by, a.window.value) for a in alerts] == [
        (AlertLevel.WARNING, D("8.00"), "b", "monthly"),
        (AlertLevel.EXCEEDED, D("10.50"), "c", "monthly"),
    ]
    assert all(a.period_start == MONTH and a.limit_usd == 10 for a in alerts)


def test_a_counter_already_past_a_level_before_the_batch_does_not_cross_it_again() -> None:
    contributions = {TENANT_MONTH: [Contribution("z", D("1"))]}
    policy = BudgetPolicy("t1", ScopeType.TENANT, "t1", monthly_limit_usd=D(10))
    alerts = alerts_crossed(
        contributions, {TENANT_MONTH: D("8.5")}, {policy.key: policy}, emitted_at=NOW
    )
    assert alerts == []
