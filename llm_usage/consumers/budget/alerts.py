"""The alerts a budget counter's crossings make: by an event's batch (the handler) or at rest,
when a policy is set below the spend already recorded (the watcher)."""

from __future__ import annotations

import functools
from collections.abc import Container, Mapping
from datetime import datetime
from decimal import Decimal

from llm_usage.consumers.budget.crossing import (
    Contribution,
    Crossing,
    crossings_at_rest,
    crossings_by_events,
)
from llm_usage.domain.budgets import (
    AlertLevel,
    CounterKey,
    SpendKey,
    alert_threshold_pct,
    threshold_usd,
)
from llm_usage.schemas.budget_alert import BudgetAlert
from llm_usage.storage.budget_spend import LimitedCounter
from llm_usage.storage.budget_status import PolicyWindow


def alert_for(
    key: CounterKey,
    crossing: Crossing,
    *,
    limit_usd: Decimal,
    warn_threshold_pct: int,
    emitted_at: datetime,
) -> BudgetAlert:
    """The alert v1 for a crossing of `key`'s counter against a limit."""
    return BudgetAlert(
        alert_id=key.alert_id(crossing.level, limit_usd),
        tenant_id=key.tenant_id,
        scope_type=key.scope_type,
        scope_id=key.scope_id,
        window=key.window,
        period_start=key.period_start,
        level=crossing.level,
        spend_usd=crossing.spend_usd,
        limit_usd=limit_usd,
        threshold_pct=alert_threshold_pct(crossing.level, warn_threshold_pct),
        triggered_by=crossing.triggered_by,
        emitted_at=emitted_at,
    )


def alerts_crossed(
    contributions: Mapping[SpendKey, list[Contribution]],
    limited: Mapping[SpendKey, LimitedCounter],
    *,
    emitted_at: datetime,
) -> list[BudgetAlert]:
    """The alerts the batch's contributions cross, counter by counter in lock order."""
    alerts: list[BudgetAlert] = []
    for spend_key in sorted(limited):
        counter = limited[spend_key]
        if not may_cross(counter):
            continue
        key = CounterKey.from_spend_key(spend_key)
        for crossing in crossings_by_events(
            counter.before_usd,
            contributions[spend_key],
            limit_usd=counter.limit_usd,
            warn_threshold_pct=counter.warn_threshold_pct,
        ):
            alerts.append(
                alert_for(
                    key,
                    crossing,
                    limit_usd=counter.limit_usd,
                    warn_threshold_pct=counter.warn_threshold_pct,
                    emitted_at=emitted_at,
                )
            )
    return alerts


@functools.lru_cache(maxsize=4096)
def _warning_threshold(limit_usd: Decimal, warn_threshold_pct: int) -> Decimal:
    return threshold_usd(AlertLevel.WARNING, limit_usd, warn_threshold_pct)


def may_cross(counter: LimitedCounter) -> bool:
    """Whether some level lies in (before, the most the batch took it to]: most counters are
    below the warning after the batch too, or past the limit before it."""
    peak = counter.after_usd if counter.peak_usd is None else counter.peak_usd
    return (
        peak >= _warning_threshold(counter.limit_usd, counter.warn_threshold_pct)
        and counter.before_usd < counter.limit_usd
    )


def crossings_at_rest_of(windows: list[PolicyWindow]) -> list[tuple[PolicyWindow, Crossing]]:
    """Every level each policy window's current spend has reached (warning first)."""
    return [
        (window, crossing)
        for window in windows
        for crossing in crossings_at_rest(
            window.spend_usd,
            limit_usd=window.limit_usd,
            warn_threshold_pct=window.warn_threshold_pct,
        )
    ]


def alert_id_of(window: PolicyWindow, crossing: Crossing) -> str:
    """The id the alert for a level reached at rest has, whether built yet or not."""
    return window.counter.alert_id(crossing.level, window.limit_usd)


def alerts_at_rest(
    reached: list[tuple[PolicyWindow, Crossing]],
    *,
    now: datetime,
    known_ids: Container[str] = frozenset(),
) -> list[BudgetAlert]:
    """The alerts of levels reached at rest (no trigger), leaving out those already decided."""
    return [
        alert_for(
            window.counter,
            crossing,
            limit_usd=window.limit_usd,
            warn_threshold_pct=window.warn_threshold_pct,
            emitted_at=now,
        )
        for window, crossing in reached
        if alert_id_of(window, crossing) not in known_ids
    ]
