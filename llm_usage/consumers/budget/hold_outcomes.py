"""What the budget consumer reports of the holds it ends: how each ended, the charge beyond the
amount held (overshoot), and an event counted in another period than its hold (design §4, A3).

Reported after the transaction that ended them commits, so a batch that is rolled back and
landed again counts nothing twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date
from decimal import Decimal

import structlog

from llm_usage.consumers.budget.metrics import HoldMetrics
from llm_usage.domain.budgets import BudgetWindow
from llm_usage.domain.money import canonical_decimal
from llm_usage.domain.periods import month_start
from llm_usage.storage.budget_holds import EndedHold

log = structlog.get_logger(__name__)

# A gateway that always underestimates would otherwise log thousands of lines a batch.
_EXAMPLES_LOGGED = 10


def overshoot_usd(hold: EndedHold) -> Decimal:
    """What the settled event charged beyond the amount held; 0 when it did not (or expired)."""
    if hold.charge_usd is None or hold.charge_usd <= hold.amount_usd:
        return Decimal(0)
    return hold.charge_usd - hold.amount_usd


def windows_missed(hold_day: date, event_day: date) -> tuple[BudgetWindow, ...]:
    """The windows whose period the event counted in is not the one its hold sat on."""
    if event_day == hold_day:
        return ()
    if month_start(event_day) == month_start(hold_day):
        return (BudgetWindow.DAILY,)
    return (BudgetWindow.DAILY, BudgetWindow.MONTHLY)


def observe_ended_holds(
    ended: Sequence[EndedHold],
    metrics: HoldMetrics,
    *,
    event_days: Mapping[str, date] | None = None,
) -> None:
    """Count `ended` by how, their overshoot, and (given the counted events' UTC days by request
    id) the holds whose event landed in another period; one log line for each kind found."""
    if not ended:
        return
    for how in {hold.how for hold in ended}:
        metrics.ended.labels(how).inc(sum(1 for hold in ended if hold.how == how))
    _report_overshoot(ended, metrics)
    if event_days:
        _report_period_mismatch(ended, metrics, event_days)


def _report_overshoot(ended: Sequence[EndedHold], metrics: HoldMetrics) -> None:
    over = [(hold, amount) for hold in ended if (amount := overshoot_usd(hold)) > 0]
    if not over:
        return
    total = sum((amount for _, amount in over), Decimal(0))
    metrics.overshoot.inc(len(over))
    metrics.overshoot_usd.inc(float(total))  # a gauge of trouble; the exact sums stay in the rows
    log.warning(
        "Events charged more than their budget check held.",
        holds=len(over),
        over_usd=canonical_decimal(total),
        examples=[
            {
                "tenant_id": hold.tenant_id,
                "gateway_request_id": hold.gateway_request_id,
                "held_usd": canonical_decimal(hold.amount_usd),
                "over_usd": canonical_decimal(amount),
            }
            for hold, amount in over[:_EXAMPLES_LOGGED]
        ],
    )


def _report_period_mismatch(
    ended: Sequence[EndedHold], metrics: HoldMetrics, event_days: Mapping[str, date]
) -> None:
    missed = [
        (hold, event_day, windows)
        for hold in ended
        if (event_day := event_days.get(hold.gateway_request_id)) is not None
        and (windows := windows_missed(hold.day, event_day))
    ]
    if not missed:
        return
    metrics.period_mismatch.inc(len(missed))
    log.warning(
        "Events counted in another UTC day or month than their budget check held.",
        holds=len(missed),
        examples=[
            {
                "tenant_id": hold.tenant_id,
                "gateway_request_id": hold.gateway_request_id,
                "hold_day": hold.day.isoformat(),
                "event_day": event_day.isoformat(),
                "windows": [str(window) for window in windows],
            }
            for hold, event_day, windows in missed[:_EXAMPLES_LOGGED]
        ],
    )
