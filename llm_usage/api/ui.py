"""`/ui/tenants/{tenant_id}`: one server-rendered page for people, from the same reads as the API.

This month's spend against each budget (bars coloured by level), the last 30 UTC days' spend
(SVG drawn here, no JavaScript), and the month's top models and users. Every number is the API's
exact string; each carries a `data-` attribute so that a test can compare it with the API.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from html import escape
from typing import Final

from llm_usage.domain.budgets import BudgetLevel, BudgetStatus
from llm_usage.domain.money import canonical_decimal
from llm_usage.domain.periods import start_of_month
from llm_usage.storage.usage_reports import BreakdownItem, DailyItem, UsageSummary

DAYS: Final = 30
TOP: Final = 5
_CHART_WIDTH, _CHART_HEIGHT, _BAR_GAP = 600, 160, 2
_COLOURS: Final = {
    BudgetLevel.OK: "#2e7d32",
    BudgetLevel.WARNING: "#f9a825",
    BudgetLevel.EXCEEDED: "#c62828",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 48rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
.budget { margin: .5rem 0; } .track { background: #eee; height: 1rem; border-radius: .25rem; }
.fill { height: 1rem; border-radius: .25rem; }
table { border-collapse: collapse; } td, th { padding: .2rem .8rem; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #777; }
"""


def _usd(value: Decimal) -> str:
    return canonical_decimal(value)


def _pixels(part: Decimal, whole: Decimal, size: int) -> int:
    """`part / whole` of `size` pixels, rounded half up; 0 when `whole` is 0. Geometry only."""
    if whole <= 0:
        return 0
    return int((part * size / whole).quantize(Decimal(1), ROUND_HALF_UP))


def _budgets(statuses: Sequence[BudgetStatus]) -> str:
    if not statuses:
        return '<p class="muted">No budget policies.</p>'
    rows = []
    for status in statuses:
        width = min(status.percent, Decimal(100))
        percent = format(status.percent, "f")
        rows.append(
            f'<div class="budget" data-scope-type="{escape(status.scope_type.value)}" '
            f'data-scope-id="{escape(status.scope_id)}" data-window="{status.window.value}" '
            f'data-spend="{_usd(status.spend_usd)}" data-limit="{_usd(status.limit_usd)}" '
            f'data-percent="{percent}" data-level="{status.level.value}">'
            f"<div>{escape(status.scope_type.value)} <b>{escape(status.scope_id)}</b>, "
            f"{status.window.value} from {status.period_start.isoformat()}: "
            f"{_usd(status.spend_usd)} of {_usd(status.limit_usd)} USD ({percent} %, "
            f"{status.level.value})</div>"
            f'<div class="track"><div class="fill" style="width: {format(width, "f")}%; '
            f'background: {_COLOURS[status.level]}"></div></div></div>'
        )
    return "\n".join(rows)


def _daily_chart(items: Sequence[DailyItem]) -> str:
    highest = max((item.customer_charge_usd for item in items), default=Decimal(0))
    bar = (_CHART_WIDTH - _BAR_GAP * len(items)) // max(len(items), 1)
    bars = []
    for index, item in enumerate(items):
        height = _pixels(item.customer_charge_usd, highest, _CHART_HEIGHT)
        x = index * (bar + _BAR_GAP)
        charge = _usd(item.customer_charge_usd)
        bars.append(
            f'<rect class="day" data-date="{item.day.isoformat()}" data-charge="{charge}" '
            f'data-requests="{item.requests}" x="{x}" y="{_CHART_HEIGHT - height}" '
            f'width="{bar}" height="{height}" fill="#1565c0">'
            f"<title>{item.day.isoformat()}: {charge} USD, {item.requests} requests</title></rect>"
        )
    return (
        f'<svg role="img" aria-label="spend per UTC day" width="{_CHART_WIDTH}" '
        f'height="{_CHART_HEIGHT + 1}" viewBox="0 0 {_CHART_WIDTH} {_CHART_HEIGHT + 1}">'
        f'<line x1="0" y1="{_CHART_HEIGHT}" x2="{_CHART_WIDTH}" y2="{_CHART_HEIGHT}" '
        f'stroke="#999"/>{"".join(bars)}</svg>'
        f'<p class="muted">{items[0].day.isoformat()} to {items[-1].day.isoformat()}; '
        f"highest day {_usd(highest)} USD</p>"
    )


def _top(by: str, items: Sequence[BreakdownItem]) -> str:
    if not items:
        return '<p class="muted">No usage this month.</p>'
    rows = "".join(
        f'<tr class="top" data-by="{by}" data-key="{escape(item.key or "")}" '
        f'data-null="{str(item.key is None).lower()}" '
        f'data-charge="{_usd(item.customer_charge_usd)}" '
        f'data-requests="{item.requests}"><td>{escape(item.key) if item.key else "<i>none</i>"}'
        f'</td><td class="num">{item.requests}</td>'
        f'<td class="num">{_usd(item.customer_charge_usd)}</td></tr>'
        for item in items
    )
    return (
        f'<table><tr><th>{by}</th><th class="num">requests</th><th class="num">USD</th></tr>'
        f"{rows}</table>"
    )


def month_range(now: datetime) -> tuple[datetime, datetime]:
    """[start of this UTC month, now): what the page reports as "this month"."""
    return start_of_month(now), now.astimezone(UTC)


def daily_range(now: datetime) -> tuple[datetime, datetime]:
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=DAYS - 1)
    return datetime.combine(first, time(0), UTC), datetime.combine(today, time(0), UTC)


def render_page(
    *,
    tenant_id: str,
    now: datetime,
    month: UsageSummary,
    budgets: Sequence[BudgetStatus],
    daily: Sequence[DailyItem],
    models: Sequence[BreakdownItem],
    users: Sequence[BreakdownItem],
) -> str:
    start, _ = month_range(now)
    title = f"Usage of {escape(tenant_id)}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head>
<body>
<h1>{title}</h1>
<p id="month" data-charge="{_usd(month.customer_charge_usd)}" data-requests="{month.requests}">
This month (from {start.date().isoformat()}, UTC): <b>{_usd(month.customer_charge_usd)} USD</b>
over {month.requests} requests. <span class="muted">As of {now.astimezone(UTC):%Y-%m-%d %H:%M} UTC.
</span></p>
<h2>Budgets</h2>
{_budgets(budgets)}
<h2>Spend per day, last {DAYS} days</h2>
{_daily_chart(daily)}
<h2>Top models this month</h2>
{_top("model", models)}
<h2>Top users this month</h2>
{_top("user", users)}
</body></html>
"""
