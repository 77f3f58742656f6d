"""The hold sweeper: ends the budget checks' holds that no batch settled, and forgets old answers.

Every `BUDGET_HOLD_SWEEP_SECONDS` each budget consumer replica tries a round; one replica at a
time sweeps (`storage.budget_holds.sweep_holds` takes a transaction-scoped advisory lock), the
others count the round as skipped. A round expires the holds past `expires_at` (or settles them,
when their event turns out counted), and deletes ended rows older than `expires_at +
BUDGET_HOLD_SECONDS`. It lives in the budget consumer because holds end where spend is counted:
with no budget consumer running no hold expires, and checks stay conservative.
"""

from __future__ import annotations

import time

import structlog

from llm_usage.consumers.budget.hold_outcomes import observe_ended_holds
from llm_usage.consumers.budget.metrics import HoldMetrics
from llm_usage.domain.holds import EXPIRED
from llm_usage.runtime.handler import ConsumerContext, SideTask
from llm_usage.runtime.retry import is_transient, sleep_unless_stopping
from llm_usage.storage.budget_holds import SweepResult, sweep_holds

log = structlog.get_logger(__name__)


def hold_sweeper(metrics: HoldMetrics) -> SideTask:
    """The sweeper as a side task of the budget consumer."""

    async def sweep_holds_until_stopped(context: ConsumerContext) -> None:
        sleep = sleep_unless_stopping(context.stopping)
        while not context.stopping.is_set():
            await sweep_once(context, metrics)
            await sleep(context.settings.budget_hold_sweep_seconds)

    return sweep_holds_until_stopped


async def sweep_once(context: ConsumerContext, metrics: HoldMetrics) -> SweepResult | None:
    """One round; None when it failed on a transient error (the next round tries again)."""
    settings = context.settings
    started = time.monotonic()
    try:
        result = await sweep_holds(
            context.pool,
            now=context.clock(),
            hold_seconds=settings.budget_hold_seconds,
            sweep_seconds=settings.budget_hold_sweep_seconds,
        )
    except Exception as error:
        if not is_transient(error):
            raise
        metrics.sweeps.labels("failed").inc()
        log.warning("Hold sweep failed; the next round tries again.", error=f"{error!r}")
        return None
    if not result.ran:
        metrics.sweeps.labels("skipped").inc()
        return result
    metrics.sweeps.labels("swept").inc()
    metrics.sweep_duration.observe(time.monotonic() - started)
    metrics.open_holds.set(result.open_holds)
    metrics.oldest_open_age.set(result.oldest_open_age_seconds)
    observe_ended_holds(result.ended, metrics)
    expired = sum(1 for hold in result.ended if hold.how == EXPIRED)
    if expired:
        # Spend those events bring later is outside the budget's guarantee (design A3).
        log.warning(
            "Budget holds expired before their events were counted.",
            expired=expired,
            hold_seconds=settings.budget_hold_seconds,
        )
    if len(result.ended) > expired or result.forgotten:
        log.info(
            "Budget holds swept.",
            settled_late=len(result.ended) - expired,
            forgotten=result.forgotten,
            open=result.open_holds,
        )
    return result
