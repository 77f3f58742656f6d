"""Which months of usage events are kept, created ahead of time, or past retention: pure."""

from __future__ import annotations

from datetime import date

from llm_usage.domain.periods import add_months, month_start

# Partitions exist this many months past the current one, so that neither a clock running a
# little fast nor a maintenance run that fails for a few weeks leaves an event without its month.
MONTHS_AHEAD = 2


def oldest_kept_month(today: date, retention_months: int) -> date:
    """The oldest month still queryable: the current month and `retention_months` before it."""
    return add_months(month_start(today), -retention_months)


def months_to_create(
    today: date, retention_months: int, *, known: set[date], covered_until: date | None = None
) -> list[date]:
    """The months from the oldest kept through MONTHS_AHEAD past the current one that have no
    partition yet (`known`: every month ever created, dropped ones included, so that a dropped
    month is never brought back), starting at `covered_until` when older months are covered by
    one legacy partition."""
    first = oldest_kept_month(today, retention_months)
    if covered_until is not None and covered_until > first:
        first = month_start(covered_until)
    last = add_months(month_start(today), MONTHS_AHEAD)
    months = []
    month = first
    while month <= last:
        if month not in known:
            months.append(month)
        month = add_months(month, 1)
    return months


def months_past_retention(today: date, retention_months: int, attached: list[date]) -> list[date]:
    """The attached months older than the oldest one kept, oldest first."""
    oldest = oldest_kept_month(today, retention_months)
    return sorted(month for month in attached if month < oldest)


def months_ahead(today: date, newest: date | None) -> int:
    """How many whole months past the current one have a partition (negative: even the current
    one is missing)."""
    current = month_start(today)
    if newest is None:
        return -1
    return (newest.year - current.year) * 12 + newest.month - current.month


def partition_name(month: date) -> str:
    """`llm_usage_events_2027_01` for January 2027."""
    return f"llm_usage_events_{month.year:04d}_{month.month:02d}"
