"""`/ui/tenants/{tenant_id}`: one server-rendered page for people, from the same reads as the API.

Today and this month at the top, budgets with their levels and how far into their periods they
are, the last 30 UTC days as a chart (ui_chart), the month's top models, users and agents, its
alerts and its preview invoice lines. Amounts read as `$1.07` with the exact figure a hover away
(ui_money); every number also sits in a `data-` attribute with the API's exact spelling, so that a
test can compare the page with the API. No JavaScript.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from html import escape
from typing import Any, Final
from urllib.parse import quote

from llm_usage.api.ui_budgets import budgets_section
from llm_usage.api.ui_chart import daily_chart
from llm_usage.api.ui_dates import day_label, period_label
from llm_usage.api.ui_money import cents_text, count_text, estimated_html, usd_html
from llm_usage.domain.budgets import BudgetStatus, BudgetWindow
from llm_usage.domain.invoices import InvoiceLine
from llm_usage.domain.money import canonical_decimal
from llm_usage.domain.periods import start_of_month
from llm_usage.storage.usage_reports import BreakdownItem, DailyItem, UsageSummary

DAYS: Final = 30
TOP: Final = 10
ALERTS: Final = 20
REFRESH_SECONDS: Final = 300  # a page kept open stays current without any JavaScript

_STYLE = """
:root { --ok: #2e7d32; --warning: #b26a00; --exceeded: #c62828; --bar: #1565c0;
  --muted: #666; --line: #e3e3e3; }
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; padding: 0 1rem; color: #222;
  max-width: 64rem; line-height: 1.4; }
h1 { font-size: 1.4rem; margin-bottom: .2rem; } h2 { font-size: 1.1rem; margin: 2rem 0 .6rem; }
h3 { font-size: 1rem; margin: .2rem 0 .4rem; }
.muted, .asof, .estimated { color: var(--muted); } .asof { margin-top: 0; }
.estimated { font-size: .85rem; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(14rem, 1fr)); gap: 1rem; }
.tile { border: 1px solid var(--line); border-radius: .5rem; padding: .8rem 1rem; }
.tile .big { font-size: 1.8rem; font-weight: 600; }
.budget { margin: .8rem 0; }
.budget-head { display: flex; justify-content: space-between; }
.badge { font-size: .8rem; font-weight: 600; padding: 0 .5rem; border-radius: 1rem; color: #fff; }
.level-ok .badge, .level-ok .fill { background: var(--ok); }
.level-warning .badge, .level-warning .fill { background: var(--warning); }
.level-exceeded .badge, .level-exceeded .fill { background: var(--exceeded); }
.track { position: relative; background: #eee; height: .9rem; border-radius: .25rem;
  margin: .2rem 0; }
.fill { height: .9rem; border-radius: .25rem; }
.now { position: absolute; top: -.25rem; width: 2px; height: 1.4rem; background: #222; }
.budget-figures { font-size: .9rem; }
svg.chart { width: 100%; height: auto; display: block; }
svg .grid { stroke: var(--line); } svg .axis { stroke: #999; }
svg .tick, svg .day-label { font-size: 11px; fill: var(--muted); }
svg .day { fill: var(--bar); } svg .today .day { fill: #64b5f6; }
svg .hit { fill: transparent; } svg .column:hover .hit { fill: rgba(0, 0, 0, .06); }
.tops { display: grid; grid-template-columns: repeat(auto-fit, minmax(26rem, 1fr)); gap: 1.5rem; }
table { border-collapse: collapse; width: 100%; }
td, th { padding: .2rem .5rem; text-align: left; border-bottom: 1px solid var(--line); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.key { overflow-wrap: anywhere; }
details { margin-top: .5rem; } table.days { max-width: 28rem; }
[title] { text-decoration-line: none; }
"""


def month_range(now: datetime) -> tuple[datetime, datetime]:
    """[start of this UTC month, now): what the page reports as "this month"."""
    return start_of_month(now), now.astimezone(UTC)


def today_range(now: datetime) -> tuple[datetime, datetime]:
    """[this UTC day's midnight, now): what the page reports as "today"."""
    moment = now.astimezone(UTC)
    return datetime.combine(moment.date(), time(0), UTC), moment


def daily_range(now: datetime) -> tuple[datetime, datetime]:
    """The first and last UTC days (as midnights) of the chart: the last `DAYS`, today included."""
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=DAYS - 1)
    return datetime.combine(first, time(0), UTC), datetime.combine(today, time(0), UTC)


@dataclass(frozen=True)
class TenantPage:
    """Everything the page shows, as the storage reads return it."""

    tenant_id: str
    now: datetime
    today: UsageSummary
    month: UsageSummary
    budgets: Sequence[BudgetStatus]
    daily: Sequence[DailyItem]
    models: Sequence[BreakdownItem]
    users: Sequence[BreakdownItem]
    agents: Sequence[BreakdownItem]
    alerts: Sequence[dict[str, Any]]
    invoice_lines: Sequence[InvoiceLine] | None  # None: the caller may not read them


def events_href(tenant_id: str, user_id: str) -> str:
    """The drill-down page of one user's events; both ids are URL-encoded whole."""
    return f"/ui/tenants/{quote(tenant_id, safe='')}/events?user_id={quote(user_id, safe='')}"


def _tile(name: str, label: str, summary: UsageSummary) -> str:
    return (
        f'<div class="tile" id="{name}" data-requests="{summary.requests}" '
        f'data-total-tokens="{summary.total_tokens}" data-input-tokens="{summary.input_tokens}" '
        f'data-output-tokens="{summary.output_tokens}" '
        f'data-charge="{canonical_decimal(summary.customer_charge_usd)}" '
        f'data-estimated="{canonical_decimal(summary.estimated_charge_usd)}">'
        f'<h3>{label}</h3><div class="big">{usd_html(summary.customer_charge_usd)}</div>'
        f"<div>{estimated_html(summary.estimated_charge_usd)}</div>"
        f"<div>{count_text(summary.requests)} requests · {count_text(summary.total_tokens)} tokens"
        f"</div></div>"
    )


def _top(by: str, items: Sequence[BreakdownItem], tenant_id: str) -> str:
    if not items:
        return f'<div><h3>Top {by}s</h3><p class="muted">No usage this month.</p></div>'
    rows = []
    for item in items:
        if item.key is None:
            name = '<i class="muted">none</i>'
        elif by == "user":
            name = f'<a href="{escape(events_href(tenant_id, item.key))}">{escape(item.key)}</a>'
        else:
            name = escape(item.key)
        rows.append(
            f'<tr class="top" data-by="{by}" data-key="{escape(item.key or "")}" '
            f'data-null="{str(item.key is None).lower()}" '
            f'data-charge="{canonical_decimal(item.customer_charge_usd)}" '
            f'data-estimated="{canonical_decimal(item.estimated_charge_usd)}" '
            f'data-requests="{item.requests}"><td class="key">{name}</td>'
            f'<td class="num">{count_text(item.requests)}</td>'
            f'<td class="num">{count_text(item.input_tokens + item.output_tokens)}</td>'
            f'<td class="num">{usd_html(item.customer_charge_usd)}'
            f"{'<br>' if item.estimated_charge_usd > 0 else ''}"
            f"{estimated_html(item.estimated_charge_usd)}</td></tr>"
        )
    return (
        f"<div><h3>Top {by}s</h3><table><thead><tr><th>{by}</th><th class=num>requests</th>"
        f"<th class=num title='input + output'>tokens</th><th class=num>spend</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _short_time(text: str) -> str:
    moment = datetime.fromisoformat(text).astimezone(UTC)
    return f"{moment:%Y-%m-%d %H:%M}"


_ALERT_DATA: Final = (
    "alert_id",
    "level",
    "threshold_pct",
    "spend_usd",
    "limit_usd",
    "scope_type",
    "scope_id",
    "window",
    "period_start",
)


def _alert_row(alert: dict[str, Any]) -> str:
    """One alert: when it was sent, for which scope and period, its level and amounts; its
    fields as on the alerts topic in `data-` attributes (`data-spend-usd`, …)."""
    data = " ".join(
        f'data-{name.replace("_", "-")}="{escape(str(alert[name]))}"' for name in _ALERT_DATA
    )
    window = BudgetWindow(alert["window"])
    period = period_label(window, date.fromisoformat(alert["period_start"]))
    level = escape(alert["level"])
    return (
        f'<tr class="alert level-{level}" {data}>'
        f'<td title="{escape(alert["emitted_at"])}">{_short_time(alert["emitted_at"])}</td>'
        f"<td>{escape(alert['scope_type'])} <b>{escape(alert['scope_id'])}</b>, "
        f"{window.value} ({period})</td>"
        f'<td><span class="badge">{level}</span></td>'
        f'<td class="num">{alert["threshold_pct"]} %</td>'
        f'<td class="num">{usd_html(Decimal(alert["spend_usd"]))}</td>'
        f'<td class="num">{usd_html(Decimal(alert["limit_usd"]))}</td></tr>'
    )


def _alerts(alerts: Sequence[dict[str, Any]]) -> str:
    if not alerts:
        return '<p class="muted">No budget alerts this month.</p>'
    more = (
        f'<p class="muted" id="alerts-more">The {ALERTS} newest; the API\'s '
        "<code>alerts</code> route has them all.</p>"
        if len(alerts) >= ALERTS
        else ""
    )
    return (
        f"{more}<table><thead><tr><th>sent (UTC)</th><th>scope and period</th><th>level</th>"
        "<th class=num>threshold</th><th class=num>spend</th><th class=num>limit</th></tr>"
        f"</thead><tbody>{''.join(_alert_row(alert) for alert in alerts)}</tbody></table>"
    )


def _invoice_lines(lines: Sequence[InvoiceLine] | None) -> str:
    if lines is None:
        return '<p class="muted">Invoice lines are shown to tenant admins.</p>'
    if not lines:
        return (
            '<p class="muted" id="no-preview">No preview yet: '
            "the rollup has not run this month.</p>"
        )
    rows = "".join(
        f'<tr class="line" data-deployment="{escape(line.deployment_id or "")}" '
        f'data-null="{str(line.deployment_id is None).lower()}" data-kind="{escape(line.kind)}" '
        f'data-qty="{line.qty}" data-amount-cents="{line.amount_cents}">'
        f"<td>{escape(line.description)}</td>"
        f"<td class=key>{escape(line.deployment_id) if line.deployment_id else '<i>none</i>'}</td>"
        f'<td class="num">{count_text(line.qty)}</td>'
        f'<td class="num" title="{line.amount_cents} cents">{cents_text(line.amount_cents)}</td>'
        "</tr>"
        for line in lines
    )
    total = sum(line.amount_cents for line in lines)
    state = "final" if all(line.closed for line in lines) else "preview, until the month closes"
    return (
        f'<p class="muted">{state}</p><table><thead><tr><th>line</th><th>deployment</th>'
        f"<th class=num>tokens</th><th class=num>amount</th></tr></thead><tbody>{rows}</tbody>"
        f'<tfoot><tr id="lines-total" data-amount-cents="{total}"><th colspan=3>total</th>'
        f'<th class="num">{cents_text(total)}</th></tr></tfoot></table>'
    )


def render_page(page: TenantPage) -> str:
    now = page.now.astimezone(UTC)
    title = f"Usage of {escape(page.tenant_id)}"
    month_start = start_of_month(now)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<style>{_STYLE}</style></head>
<body>
<h1>{title}</h1>
<p class="asof" id="asof" data-now="{now.isoformat()}">As of {now:%Y-%m-%d %H:%M} UTC.
Days and months are UTC; hover over an amount for its exact figure. The page reloads itself
every {REFRESH_SECONDS // 60} minutes.</p>
<div class="tiles">
{_tile("today", f"Today, {day_label(now.date())}", page.today)}
{_tile("month", f"This month, from {day_label(month_start.date())}", page.month)}
</div>
<h2>Budgets</h2>
{budgets_section(page.budgets, now=now)}
<h2>Spend per day, last {DAYS} days</h2>
{daily_chart(page.daily)}
<h2>This month's top {TOP}</h2>
<div class="tops">
{_top("model", page.models, page.tenant_id)}
{_top("user", page.users, page.tenant_id)}
{_top("agent", page.agents, page.tenant_id)}
</div>
<h2>Budget alerts this month</h2>
{_alerts(page.alerts)}
<h2>Invoice lines for {month_start:%Y-%m}</h2>
{_invoice_lines(page.invoice_lines)}
</body></html>
"""
