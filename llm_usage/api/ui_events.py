"""`/ui/tenants/{tenant_id}/events`: a tenant's events, newest first, a page at a time, for the
support person who asks "what did this user spend yesterday, request by request".

Server-rendered, no JavaScript. Each row shows what the event counts for now (its effective
values: a corrected event says so, with what was sent in the mark's `title`; a voided one is
struck through) and carries those exact values in `data-` attributes (so a test can compare them
with the API); a charge reads `$1.07`, with the exact figure in its `title`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Final
from urllib.parse import quote, urlencode

from llm_usage.api.ui_money import request_usd_text
from llm_usage.domain.money import canonical_decimal
from llm_usage.storage.usage_event_pages import UsageEventItem

_FILTER_LABELS: Final = {
    "user_id": "user",
    "agent_id": "agent",
    "deployment_id": "deployment",
    "model": "model",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.4rem; }
table { border-collapse: collapse; } td, th { padding: .2rem .8rem; text-align: left; }
tr:nth-child(even) td { background: #f6f6f6; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted, .estimated, .corrected { color: #777; } nav a { margin-right: 1rem; }
tr[data-voided="true"] td { text-decoration: line-through; color: #777; }
"""


def _text(value: str | None) -> str:
    return escape(value) if value is not None else '<i class="muted">none</i>'


def tenant_page_url(tenant_id: str) -> str:
    """The tenant's page; the id URL-encoded whole (a `%41` in it stays `%41`)."""
    return f"/ui/tenants/{quote(tenant_id, safe='')}"


def events_url(tenant_id: str, query: Mapping[str, str | None]) -> str:
    """The page's address with `query` (parameters that are None left out)."""
    kept = {name: value for name, value in query.items() if value is not None}
    suffix = f"?{urlencode(kept)}" if kept else ""
    return f"{tenant_page_url(tenant_id)}/events{suffix}"


def _estimated_mark(event: UsageEventItem) -> str:
    if not event.effective.charge_estimated:
        return ""
    since = event.price_effective_from
    price = f" from the price of {since.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC" if since else ""
    return f' <abbr class="estimated" title="estimated{price}">est.</abbr>'


def _corrected_mark(event: UsageEventItem) -> str:
    """What a correction changed: the values as sent, in the mark's title."""
    if not event.corrected:
        return ""
    word = "voided" if event.effective.voided else "corrected"
    sent = (
        f"as sent: {canonical_decimal(event.customer_charge_usd)} USD, {event.total_tokens} "
        f"tokens, user {event.user_id}, agent {event.agent_id}, deployment {event.deployment_id}"
    )
    return f' <abbr class="corrected" title="{escape(f"{word}; {sent}")}">{word}</abbr>'


def _row(event: UsageEventItem, tenant_id: str, base: Mapping[str, str | None]) -> str:
    shown = event.effective
    charge = canonical_decimal(shown.customer_charge_usd)
    user = (
        f'<a href="{escape(events_url(tenant_id, {**base, "user_id": shown.user_id}))}">'
        f"{escape(shown.user_id)}</a>"
        if shown.user_id is not None
        else _text(None)
    )
    return (
        f'<tr class="event" data-id="{escape(event.gateway_request_id)}" '
        f'data-charge="{charge}" data-total-tokens="{shown.total_tokens}" '
        f'data-corrected="{str(event.corrected).lower()}" '
        f'data-voided="{str(shown.voided).lower()}">'
        f"<td>{event.occurred_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}</td>"
        f"<td>{user}</td><td>{_text(shown.agent_id)}</td><td>{_text(shown.deployment_id)}</td>"
        f"<td>{_text(event.model)}</td>"
        f'<td class="num" title="input {shown.input_tokens}, output {shown.output_tokens}">'
        f"{shown.total_tokens}</td>"
        f'<td class="num charge" title="{charge} USD">{request_usd_text(shown.customer_charge_usd)}'
        f"{_estimated_mark(event)}{_corrected_mark(event)}</td></tr>"
    )


def _active_filters(filters: Mapping[str, str], start: datetime, end: datetime) -> str:
    shown = [
        f'<span class="filter" data-name="{name}" data-value="{escape(value)}">'
        f"{_FILTER_LABELS[name]} <b>{escape(value)}</b></span>"
        for name, value in filters.items()
    ]
    period = f"from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
    return f'<p id="filters">{", ".join([*shown, period])}</p>'


def render_events_page(
    *,
    tenant_id: str,
    events: Sequence[UsageEventItem],
    filters: Mapping[str, str],
    query: Mapping[str, str | None],
    start: datetime,
    end: datetime,
    newer: str | None,
    older: str | None,
) -> str:
    """The page. `query` is what its links keep (filters and range); `newer` and `older` are
    the addresses of the neighbouring pages (None: there is none)."""
    title = f"Events of {escape(tenant_id)}"
    links = [f'<a id="back" href="{tenant_page_url(tenant_id)}">Back to usage</a>']
    if filters:
        everything = {name: value for name, value in query.items() if name not in filters}
        links.append(
            f'<a id="all" href="{escape(events_url(tenant_id, everything))}">All events</a>'
        )
    if newer is not None:
        links.append(f'<a id="newer" rel="prev" href="{escape(newer)}">&larr; Newer</a>')
    if older is not None:
        links.append(f'<a id="older" rel="next" href="{escape(older)}">Older &rarr;</a>')
    if events:
        rows = "".join(_row(event, tenant_id, query) for event in events)
        table = (
            "<table><tr><th>time (UTC)</th><th>user</th><th>agent</th><th>deployment</th>"
            f'<th>model</th><th class="num">tokens</th><th class="num">charge</th></tr>{rows}'
            "</table>"
        )
    else:
        table = '<p class="muted">No events match.</p>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head>
<body>
<h1>{title}</h1>
{_active_filters(filters, start, end)}
<nav>{"".join(links)}</nav>
{table}
</body></html>
"""
