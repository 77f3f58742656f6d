"""The page's 30-day chart: spend per UTC day as SVG bars drawn on the server, on a money axis.

The axis has a few gridlines at round amounts (`money_axis`), days are labelled weekly back from
today, and every day's figure is a hover away (an SVG `<title>` per column) and in a table under
the chart (`<details>`), for people who do not hover and for tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_CEILING, Decimal
from typing import Final

from llm_usage.api.ui_dates import day_label
from llm_usage.api.ui_money import axis_text, count_text, estimated_html, usd_html, usd_text
from llm_usage.domain.money import canonical_decimal
from llm_usage.storage.usage_reports import DailyItem

_STEPS: Final = (Decimal(1), Decimal(2), Decimal("2.5"), Decimal(5), Decimal(10))
LABEL_EVERY: Final = 7

# Geometry in SVG units; the SVG scales to the page's width.
_WIDTH, _HEIGHT = 720, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 8, 10, 24
_PLOT_WIDTH, _PLOT_HEIGHT = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM


def money_axis(highest: Decimal, *, lines: int = 4) -> list[Decimal]:
    """Gridline amounts from 0 up to the first one at or above `highest`: at most `lines` steps
    of 1, 2, 2.5 or 5 times a power of ten, each an exact decimal. No spend: 0 and $1."""
    if highest <= 0:
        return [Decimal(0), Decimal(1)]
    rough = highest / lines  # geometry, not money: this division may round
    power = Decimal(1).scaleb(rough.adjusted())
    step = next(power * factor for factor in _STEPS if power * factor >= rough)
    count = int((highest / step).to_integral_value(ROUND_CEILING))
    return [step * index for index in range(count + 1)]


def labelled_days(count: int) -> set[int]:
    """The indexes (oldest first) that get a label: the last (today) and every `LABEL_EVERY`th
    day back from it, so the labels fall on the same weekday."""
    return set(range(count - 1, -1, -LABEL_EVERY))


def _number(value: Decimal) -> str:
    return format(value.quantize(Decimal("0.1")), "f")


def daily_chart(items: Sequence[DailyItem]) -> str:
    """The SVG chart and, under it, the table of every day's requests and spend."""
    highest = max((item.customer_charge_usd for item in items), default=Decimal(0))
    ticks = money_axis(highest)
    top, step = ticks[-1], ticks[1] - ticks[0]
    column = Decimal(_PLOT_WIDTH) / max(len(items), 1)
    bar = column * Decimal("0.8")

    def y(amount: Decimal) -> Decimal:
        return _TOP + _PLOT_HEIGHT - amount * _PLOT_HEIGHT / top

    grid = "".join(
        f'<line class="grid" x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{_number(y(tick))}" '
        f'y2="{_number(y(tick))}"/>'
        f'<text class="tick" x="{_LEFT - 6}" y="{_number(y(tick) + 4)}" text-anchor="end">'
        f"{axis_text(tick, step)}</text>"
        for tick in ticks
    )
    labelled = labelled_days(len(items))
    columns = []
    for index, item in enumerate(items):
        x = _LEFT + column * index
        charge = canonical_decimal(item.customer_charge_usd)
        estimated = canonical_decimal(item.estimated_charge_usd)
        of_which = (
            f", of which {usd_text(item.estimated_charge_usd)} estimated"
            if item.estimated_charge_usd > 0
            else ""
        )
        height = item.customer_charge_usd * _PLOT_HEIGHT / top
        today = " today" if index == len(items) - 1 else ""
        label = (
            f'<text class="day-label" x="{_number(x + column / 2)}" y="{_HEIGHT - 6}" '
            f'text-anchor="middle">{day_label(item.day)}</text>'
            if index in labelled
            else ""
        )
        columns.append(
            f'<g class="column{today}"><title>{day_label(item.day)} {item.day.year}'
            f"{' (today, so far)' if today else ''}: {usd_text(item.customer_charge_usd)} "
            f"({charge} USD){of_which}, {count_text(item.requests)} requests</title>"
            f'<rect class="hit" x="{_number(x)}" y="{_TOP}" width="{_number(column)}" '
            f'height="{_PLOT_HEIGHT}"/>'
            f'<rect class="day" data-date="{item.day.isoformat()}" data-charge="{charge}" '
            f'data-estimated="{estimated}" data-requests="{item.requests}" '
            f'x="{_number(x + (column - bar) / 2)}" '
            f'y="{_number(y(item.customer_charge_usd))}" width="{_number(bar)}" '
            f'height="{_number(height)}"/>{label}</g>'
        )
    rows = "".join(
        f'<tr class="day-row" data-date="{item.day.isoformat()}" '
        f'data-requests="{item.requests}" '
        f'data-charge="{canonical_decimal(item.customer_charge_usd)}" '
        f'data-estimated="{canonical_decimal(item.estimated_charge_usd)}">'
        f"<td>{item.day.isoformat()}</td><td class=num>{count_text(item.requests)}</td>"
        f"<td class=num>{usd_html(item.customer_charge_usd)}"
        f"{'<br>' if item.estimated_charge_usd > 0 else ''}"
        f"{estimated_html(item.estimated_charge_usd)}</td></tr>"
        for item in reversed(items)
    )
    first, last = items[0].day, items[-1].day
    return (
        f'<svg class="chart" role="img" viewBox="0 0 {_WIDTH} {_HEIGHT}" '
        f'aria-label="Spend per UTC day from {first.isoformat()} to {last.isoformat()}">'
        f'{grid}<line class="axis" x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{_TOP + _PLOT_HEIGHT}" '
        f'y2="{_TOP + _PLOT_HEIGHT}"/>{"".join(columns)}</svg>'
        f"<details><summary>Every day's requests and spend</summary>"
        f'<table class="days"><thead><tr><th>UTC day</th><th class=num>requests</th>'
        f"<th class=num>spend</th></tr></thead><tbody>{rows}</tbody></table></details>"
    )
