"""The page's budgets: each policy window's spend against its limit, its level in colour and in
words, and how far into its period (UTC day or month) it is, so that 60 % spent on day 6 of 31
reads differently from 60 % spent on day 28. A window whose limit blocks budget checks says so,
and what open holds keep back is shown beside the spend when there is any."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from html import escape

from llm_usage.api.ui_money import usd_html
from llm_usage.domain.budgets import BudgetStatus, BudgetWindow, Enforcement, period_end
from llm_usage.domain.money import canonical_decimal


@dataclass(frozen=True)
class PeriodProgress:
    """How much of a budget period has passed at `now`."""

    fraction: Decimal  # 0 to 1, for the marker on the bar
    text: str  # "day 6 of 31", "14 h of 24 h"


def period_progress(window: BudgetWindow, period_start: datetime, now: datetime) -> PeriodProgress:
    """The share of the period (starting at `period_start`, a UTC midnight) that has passed at
    `now`: for a month, the day of the month; for a day, whole hours passed."""
    last_day = period_end(window, period_start.date())
    end = datetime.combine(last_day + timedelta(days=1), time(0), UTC)
    passed, length = now - period_start, end - period_start
    second = timedelta(seconds=1)
    share = Decimal(passed // second) / Decimal(length // second)
    fraction = min(max(share, Decimal(0)), Decimal(1))
    if window is BudgetWindow.DAILY:
        return PeriodProgress(fraction, f"{passed // timedelta(hours=1)} h of 24 h")
    return PeriodProgress(fraction, f"day {now.astimezone(UTC).day} of {last_day.day}")


def _percent(value: Decimal) -> str:
    return format(value, "f")


def budgets_section(statuses: Sequence[BudgetStatus], *, now: datetime) -> str:
    if not statuses:
        return '<p class="muted">No budget policies.</p>'
    rows = []
    for status in statuses:
        start = datetime.combine(status.period_start, time(0), UTC)
        progress = period_progress(status.window, start, now)
        fill = min(status.percent, Decimal(100))
        marker = (progress.fraction * 100).quantize(Decimal("0.1"))
        level = status.level.value
        blocks = " · blocks" if status.enforcement is Enforcement.BLOCK else ""
        held = f" + {usd_html(status.held_usd)} held" if status.held_usd else ""
        rows.append(
            f'<div class="budget level-{level}" '
            f'data-scope-type="{escape(status.scope_type.value)}" '
            f'data-scope-id="{escape(status.scope_id)}" data-window="{status.window.value}" '
            f'data-period-start="{status.period_start.isoformat()}" '
            f'data-spend="{canonical_decimal(status.spend_usd)}" '
            f'data-limit="{canonical_decimal(status.limit_usd)}" '
            f'data-percent="{_percent(status.percent)}" data-level="{level}" '
            f'data-held="{canonical_decimal(status.held_usd)}" '
            f'data-enforcement="{status.enforcement.value}" '
            f'data-progress="{escape(progress.text)}">'
            f'<div class="budget-head"><span>{escape(status.scope_type.value)} '
            f"<b>{escape(status.scope_id)}</b>, {status.window.value}{blocks}</span>"
            f'<span class="badge">{level}</span></div>'
            f'<div class="track" role="img" aria-label="{_percent(status.percent)} % spent, '
            f'{escape(progress.text)}"><div class="fill" style="width: {_percent(fill)}%"></div>'
            f'<div class="now" style="left: {_percent(marker)}%" '
            f'title="{escape(progress.text)}"></div></div>'
            f'<div class="budget-figures">{usd_html(status.spend_usd)}{held} of '
            f"{usd_html(status.limit_usd)} ({_percent(status.percent)} %) · "
            f'<span class="progress">{escape(progress.text)}</span></div></div>'
        )
    return "\n".join(rows)
