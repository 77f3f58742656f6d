"""`rollup run` and `rollup close`: a month's lines computed from the daily pre-aggregate and
stored in one transaction, so a failed run leaves the month as it was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import NamedTuple, TypeAlias

import asyncpg

from llm_usage.core.errors import UserFacingError
from llm_usage.domain.invoices import InvoiceLine
from llm_usage.domain.period_charges import effective_period_charges
from llm_usage.domain.periods import (
    current_period,
    first_open_after,
    following_period,
    month_has_ended,
    next_month,
    parse_period,
)
from llm_usage.domain.usage import Usage
from llm_usage.rollup.lines import (
    adjustment_lines,
    billed_so_far,
    plan_true_up_lines,
    usage_lines,
)
from llm_usage.storage.correction_billing import (
    CorrectionKey,
    mark_corrections_billed,
    unbilled_corrections,
)
from llm_usage.storage.invoice_lines import (
    LateMark,
    close_period,
    closed_lines_billing,
    closed_periods,
    first_month_with_usage_before,
    forget_late_marks,
    late_marks,
    lines_for,
    lock_month_for_close,
    lock_rollup,
    monthly_usage,
    replace_open_lines,
    tenants_with_usage,
    usage_of_tenants,
)
from llm_usage.storage.period_charges import period_charges_of_month
from llm_usage.storage.pool import Connection, connection_from

# Tenants computed per step: the progress a long run reports, one query each.
TENANTS_PER_STEP = 200

# Told (done, total) tenants as a run goes.
Progress: TypeAlias = Callable[[int, int], None]


class PeriodNotClosableError(UserFacingError):
    """Closing the current or a future month, or one after a month still open."""


@dataclass(frozen=True)
class RollupResult:
    period: str
    lines: list[InvoiceLine]
    closed: bool


class ComputedLines(NamedTuple):
    lines: list[InvoiceLine]
    handled: list[LateMark]  # the marks of late usage whose true-ups the lines hold
    corrections: list[CorrectionKey]  # the late corrections those true-ups considered


async def _compute_lines(
    connection: Connection,
    period: str,
    tenant_id: str | None,
    closed: set[str],
    progress: Progress | None = None,
) -> ComputedLines:
    """The month's lines, the marks of late usage whose true-ups they hold, and the late
    corrections those true-ups considered."""
    first_day = parse_period(period)
    after = next_month(first_day)
    tenants = (
        [tenant_id]
        if tenant_id is not None
        else await tenants_with_usage(connection, first_day=first_day, next_month=after)
    )
    lines: list[InvoiceLine] = []
    for start in range(0, len(tenants), TENANTS_PER_STEP):
        # A range of the listed (database-ordered) tenants: its statement keeps an index range
        # scan when PostgreSQL plans it generically, as it does on a reused connection.
        chunk = tenants[start : start + TENANTS_PER_STEP]
        by_tenant: dict[str, dict[str | None, Usage]] = {}
        for tenant, deployment, usage in await monthly_usage(
            connection, first_day=first_day, next_month=after, tenants=(chunk[0], chunk[-1])
        ):
            by_tenant.setdefault(tenant, {})[deployment] = usage
        for tenant in sorted(by_tenant):
            lines.extend(usage_lines(tenant, period, by_tenant[tenant]))
        if progress is not None:
            progress(min(start + TENANTS_PER_STEP, len(tenants)), len(tenants))
    # Plan-inclusive deployments bill their period charge: a true-up beside each usage line.
    charges = effective_period_charges(
        await period_charges_of_month(
            connection, period=period, tenants=None if tenant_id is None else [tenant_id]
        )
    )
    lines.extend(plan_true_up_lines(period, lines, charges))

    # True-ups for the marked tenants of closed months whose late usage is billed in this month
    # (the first open month after them), on every run of it until it closes.
    handled = [
        mark
        for mark in await late_marks(connection, tenant_id=tenant_id)
        if mark.period in closed
        and mark.period < period
        and first_open_after(mark.period, closed) == period
    ]
    marked: dict[str, set[str]] = {}
    for mark in handled:
        marked.setdefault(mark.period, set()).add(mark.tenant_id)
    considered: list[CorrectionKey] = []
    for month in sorted(marked):
        month_first = parse_period(month)
        marked_tenants = sorted(marked[month])
        corrections = await unbilled_corrections(
            connection,
            first_day=month_first,
            next_month=next_month(month_first),
            tenants=marked_tenants,
        )
        considered.extend(
            {(tenant, cid) for (tenant, _), ids in corrections.items() for cid in ids}
        )
        totals = {
            (tenant, deployment): usage
            for tenant, deployment, usage in await usage_of_tenants(
                connection,
                first_day=month_first,
                next_month=next_month(month_first),
                tenants=marked_tenants,
            )
        }
        billed = billed_so_far(
            await closed_lines_billing(connection, original_period=month, tenants=marked_tenants)
        )
        month_charges = effective_period_charges(
            await period_charges_of_month(connection, period=month, tenants=marked_tenants)
        )
        lines += adjustment_lines(
            period=period,
            original_period=month,
            totals=totals,
            billed=billed,
            charges=month_charges,
            corrections=corrections,
        )
    return ComputedLines(lines, handled, sorted(considered))


async def run_rollup(
    pool: asyncpg.Pool,
    *,
    period: str,
    tenant_id: str | None = None,
    progress: Progress | None = None,
) -> RollupResult:
    """Compute and store the open month's lines (replacing its earlier ones), or return a
    closed month's frozen lines unchanged."""
    parse_period(period)
    async with connection_from(pool) as connection, connection.transaction():
        await lock_rollup(connection)
        closed = set(await closed_periods(connection))
        if period in closed:
            frozen = await lines_for(connection, period=period, tenant_id=tenant_id)
            return RollupResult(period, frozen, True)
        lines = (await _compute_lines(connection, period, tenant_id, closed, progress)).lines
        await replace_open_lines(
            connection,
            period=period,
            tenant_id=tenant_id,
            lines=lines,
        )
    return RollupResult(period, lines, False)


async def month_lines(
    connection: Connection, *, period: str, tenant_id: str | None = None
) -> RollupResult:
    """The month's lines as `rollup run` prints them, without storing anything: a closed month's
    frozen lines, an open month's computed now. For readers such as `prices preview`."""
    parse_period(period)
    closed = set(await closed_periods(connection))
    if period in closed:
        return RollupResult(
            period, await lines_for(connection, period=period, tenant_id=tenant_id), True
        )
    lines = (await _compute_lines(connection, period, tenant_id, closed)).lines
    return RollupResult(period, lines, False)


async def close_month(
    pool: asyncpg.Pool, *, period: str, now: datetime, progress: Progress | None = None
) -> RollupResult:
    """Run the month one last time and close it: its lines are final from then on."""
    first_day = parse_period(period)
    if not month_has_ended(period, now):
        raise PeriodNotClosableError(
            f"{period} has not ended yet (it is {current_period(now)} in UTC); only a past month "
            "can be closed"
        )
    async with connection_from(pool) as connection, connection.transaction():
        await lock_rollup(connection)
        closed = set(await closed_periods(connection))
        if period in closed:
            frozen = await lines_for(connection, period=period)
            return RollupResult(period, frozen, True)
        still_open = _open_months_before(
            await first_month_with_usage_before(connection, first_day), period, closed
        )
        if still_open:
            raise PeriodNotClosableError(
                f"{still_open[0]} is still open; close the months in order "
                f"(`llm-usage rollup close --period {still_open[0]}` first)"
            )
        # Batches adding to this month wait from here until the close commits: the ones under
        # way have committed (their usage is read below); later ones see the month closed.
        await lock_month_for_close(connection, period)
        lines, handled, corrections = await _compute_lines(
            connection, period, None, closed, progress
        )
        await replace_open_lines(connection, period=period, tenant_id=None, lines=lines)
        await close_period(connection, period)
        # Billed for good in these final lines (unless a batch marked one again meanwhile).
        await forget_late_marks(connection, handled)
        await mark_corrections_billed(connection, period=period, corrections=corrections)
    return RollupResult(period, [replace(line, closed=True) for line in lines], True)


def _open_months_before(first_with_usage: str | None, period: str, closed: set[str]) -> list[str]:
    """Months from the first with usage up to `period` (excluded) that are not closed, with or
    without usage: months close in order, so that a late event's month is always followed by
    the open month that bills it."""
    if first_with_usage is None:
        return []
    months, month = [], first_with_usage
    while month < period:
        if month not in closed:
            months.append(month)
        month = following_period(month)
    return months
