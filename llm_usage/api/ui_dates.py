"""Days and periods on the page as people read them (`Nov 24`, `Nov 2026`), the same in every
locale: month names are spelled here, not taken from the process's locale."""

from __future__ import annotations

from datetime import date
from typing import Final

from llm_usage.domain.budgets import BudgetWindow

_MONTHS: Final = "JanFebMarAprMayJunJulAugSepOctNovDec"


def _month(day: date) -> str:
    return _MONTHS[3 * (day.month - 1) : 3 * day.month]


def day_label(day: date) -> str:
    """`Nov 24`."""
    return f"{_month(day)} {day.day}"


def period_label(window: BudgetWindow, period_start: date) -> str:
    """A budget period: its day (`Nov 24`) or its month (`Nov 2026`)."""
    if window is BudgetWindow.DAILY:
        return day_label(period_start)
    return f"{_month(period_start)} {period_start.year}"
