"""Which alert levels a counter crosses: pure functions over exact decimals, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

from llm_usage.domain.budgets import AlertLevel, threshold_usd
from llm_usage.domain.money import EXACT_CONTEXT


class Contribution(NamedTuple):
    """One counted event's charge to one counter (a tuple: a batch makes thousands)."""

    gateway_request_id: str
    amount_usd: Decimal


@dataclass(frozen=True)
class Crossing:
    """A level reached: the spend at that moment and the event that reached it (None when a
    policy change, not an event, put the spend past the threshold)."""

    level: AlertLevel
    spend_usd: Decimal
    triggered_by: str | None


def crossings_by_events(
    before_usd: Decimal,
    contributions: Sequence[Contribution],
    *,
    limit_usd: Decimal,
    warn_threshold_pct: int,
) -> list[Crossing]:
    """Levels whose threshold lies in (before, after]: each is reached by the first event that
    brings the running spend to it or past it. Both levels may fall to one event (warning
    first). A level already reached before the batch is not crossed again."""
    thresholds = [
        (level, threshold_usd(level, limit_usd, warn_threshold_pct)) for level in AlertLevel
    ]
    pending = [(level, t) for level, t in thresholds if before_usd < t]
    crossings: list[Crossing] = []
    running = before_usd
    for contribution in contributions:
        if not pending:
            break
        running = EXACT_CONTEXT.add(running, contribution.amount_usd)
        while pending and running >= pending[0][1]:
            level, _ = pending.pop(0)
            crossings.append(Crossing(level, running, contribution.gateway_request_id))
    return crossings


def crossings_at_rest(
    spend_usd: Decimal, *, limit_usd: Decimal, warn_threshold_pct: int
) -> list[Crossing]:
    """Levels a spend has already reached, for a policy set (or lowered) below it: warning
    first, no triggering event."""
    return [
        Crossing(level, spend_usd, None)
        for level in AlertLevel
        if spend_usd >= threshold_usd(level, limit_usd, warn_threshold_pct)
    ]
