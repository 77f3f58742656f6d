"""What the budget consumer reports of the holds it ends: overshoot and period mismatch, pure."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry

from llm_usage.consumers.budget.hold_outcomes import (
    observe_ended_holds,
    overshoot_usd,
    windows_missed,
)
from llm_usage.consumers.budget.metrics import HoldMetrics
from llm_usage.domain.budgets import BudgetWindow
from llm_usage.storage.budget_holds import EndedHold

DAILY, MONTHLY = BudgetWindow.DAILY, BudgetWindow.MONTHLY


def hold(
    amount: str, charge: str | None, *, how: str = "settled", day: date = date(2031, 3, 14)
) -> EndedHold:
    return EndedHold(
        tenant_id="t1",
        gateway_request_id=f"r-{amount}-{charge}-{how}",
        amount_usd=Decimal(amount),
        day=day,
        charge_usd=None if charge is None else Decimal(charge),
        how=how,
    )


@pytest.mark.parametrize(
    ("amount", "charge", "over"),
    [
        ("0.01", "0.0054", "0"),
        ("0.01", "0.01", "0"),  # equal is within the hold
        ("0.01", "0.010000000000000001", "0.000000000000000001"),
        ("0", "0.5", "0.5"),
        ("1.00", None, "0"),  # expired: no charge known
    ],
)
def test_overshoot_is_the_charge_beyond_the_amount_held(
    amount: str, charge: str | None, over: str
) -> None:
    assert overshoot_usd(hold(amount, charge)) == Decimal(over)


@pytest.mark.parametrize(
    ("hold_day", "event_day", "missed"),
    [
        (date(2031, 3, 14), date(2031, 3, 14), ()),
        (date(2031, 3, 14), date(2031, 3, 13), (DAILY,)),
        (date(2031, 3, 31), date(2031, 4, 1), (DAILY, MONTHLY)),  # a check just before midnight
        (date(2031, 12, 31), date(2032, 1, 1), (DAILY, MONTHLY)),
        (date(2032, 2, 29), date(2032, 3, 1), (DAILY, MONTHLY)),
        (date(2031, 3, 1), date(2030, 3, 1), (DAILY, MONTHLY)),  # same month, another year
    ],
)
def test_a_period_is_missed_when_the_event_counted_in_another_day_or_month(
    hold_day: date, event_day: date, missed: tuple[BudgetWindow, ...]
) -> None:
    assert windows_missed(hold_day, event_day) == missed


def test_ended_holds_are_counted_by_how_with_overshoot_and_mismatch() -> None:
    registry = CollectorRegistry()
    metrics = HoldMetrics.create(registry)
    settled_over = hold("0.01", "0.03")
    settled_late_day = hold("0.01", "0.005", day=date(2031, 3, 15))
    ended = [
        settled_over,
        settled_late_day,
        hold("0.02", "0.05", how="settled_late"),
        hold("0.5", None, how="expired"),
    ]
    event_days = {
        settled_over.gateway_request_id: date(2031, 3, 14),
        settled_late_day.gateway_request_id: date(2031, 3, 14),
    }

    observe_ended_holds(ended, metrics, event_days=event_days)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("llm_usage_budget_holds_ended_total", how="settled") == 2
    assert value("llm_usage_budget_holds_ended_total", how="settled_late") == 1
    assert value("llm_usage_budget_holds_ended_total", how="expired") == 1
    assert value("llm_usage_budget_hold_overshoot_total") == 2
    assert value("llm_usage_budget_hold_overshoot_usd_total") == pytest.approx(0.05)
    assert value("llm_usage_budget_hold_period_mismatch_total") == 1


def test_every_label_value_is_served_before_its_first_increment() -> None:
    registry = CollectorRegistry()
    HoldMetrics.create(registry)
    for how in ("settled", "expired", "settled_late"):
        assert registry.get_sample_value("llm_usage_budget_holds_ended_total", {"how": how}) == 0
    for result in ("swept", "skipped", "failed"):
        assert (
            registry.get_sample_value("llm_usage_budget_hold_sweeps_total", {"result": result}) == 0
        )
