"""The page's chart and budget geometry: a money axis of round steps that covers the highest day,
weekly day labels ending today, and how far into its period a budget is."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_usage.api.ui_budgets import period_progress
from llm_usage.api.ui_chart import labelled_days, money_axis
from llm_usage.api.ui_dates import day_label, period_label
from llm_usage.domain.budgets import BudgetWindow


@pytest.mark.parametrize(
    ("highest", "ticks"),
    [
        ("0", ["0", "1"]),
        ("1", ["0", "0.25", "0.5", "0.75", "1"]),
        ("9.87", ["0", "2.5", "5", "7.5", "10"]),
        ("10", ["0", "2.5", "5", "7.5", "10"]),
        ("10.01", ["0", "5", "10", "15"]),
        ("0.0123", ["0", "0.005", "0.01", "0.015"]),
        ("1234.5", ["0", "500", "1000", "1500"]),
        ("0.000000000000000001", ["0", "2.5E-19", "5E-19", "7.5E-19", "1E-18"]),
    ],
)
def test_money_axis_steps_are_round(highest: str, ticks: list[str]) -> None:
    assert money_axis(Decimal(highest)) == [Decimal(tick) for tick in ticks]


@given(st.decimals(min_value=Decimal("1E-18"), max_value=Decimal(10**13), allow_nan=False))
def test_money_axis_covers_the_highest_day_in_at_most_four_round_steps(highest: Decimal) -> None:
    ticks = money_axis(highest)
    step = ticks[1]
    assert ticks[0] == 0
    assert ticks[-2] < highest <= ticks[-1]
    assert 2 <= len(ticks) <= 5
    assert all(b - a == step for a, b in pairwise(ticks))
    assert step.normalize().as_tuple().digits in {(1,), (2,), (2, 5), (5,)}


def test_days_are_labelled_weekly_back_from_today() -> None:
    assert sorted(labelled_days(30)) == [1, 8, 15, 22, 29]
    assert sorted(labelled_days(7)) == [6]
    assert labelled_days(0) == set()


@pytest.mark.parametrize(
    ("day", "label"),
    [(date(2027, 1, 1), "Jan 1"), (date(2028, 2, 29), "Feb 29"), (date(2026, 12, 31), "Dec 31")],
)
def test_day_label(day: date, label: str) -> None:
    assert day_label(day) == label


def test_period_label_names_the_day_or_the_month() -> None:
    assert period_label(BudgetWindow.DAILY, date(2026, 11, 24)) == "Nov 24"
    assert period_label(BudgetWindow.MONTHLY, date(2026, 11, 1)) == "Nov 2026"


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize(
    ("window", "start", "now", "text", "fraction"),
    [
        (BudgetWindow.DAILY, "2026-11-24T00:00Z", "2026-11-24T00:00Z", "0 h of 24 h", "0"),
        (BudgetWindow.DAILY, "2026-11-24T00:00Z", "2026-11-24T14:59:59Z", "14 h of 24 h", None),
        (BudgetWindow.DAILY, "2026-11-24T00:00Z", "2026-11-24T12:00Z", "12 h of 24 h", "0.5"),
        (BudgetWindow.DAILY, "2026-11-24T00:00Z", "2026-11-24T23:59:59Z", "23 h of 24 h", None),
        (BudgetWindow.MONTHLY, "2026-11-01T00:00Z", "2026-11-01T00:00Z", "day 1 of 30", "0"),
        (BudgetWindow.MONTHLY, "2026-12-01T00:00Z", "2026-12-06T14:00Z", "day 6 of 31", None),
        (BudgetWindow.MONTHLY, "2028-02-01T00:00Z", "2028-02-29T23:00Z", "day 29 of 29", None),
        (BudgetWindow.MONTHLY, "2027-02-01T00:00Z", "2027-02-15T00:00Z", "day 15 of 28", "0.5"),
        (BudgetWindow.MONTHLY, "2026-12-01T00:00Z", "2026-12-31T23:59:59Z", "day 31 of 31", None),
    ],
)
def test_period_progress(
    window: BudgetWindow, start: str, now: str, text: str, fraction: str | None
) -> None:
    progress = period_progress(window, _at(start), _at(now))
    assert progress.text == text
    assert 0 <= progress.fraction < 1
    if fraction is not None:
        assert progress.fraction == Decimal(fraction)


def test_period_progress_reads_now_in_utc() -> None:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    late_in_new_york = _at("2026-12-05T22:00-05:00")  # already the 6th in UTC
    assert period_progress(BudgetWindow.MONTHLY, start, late_in_new_york).text == "day 6 of 31"
