"""A batch's one addition to the spend counters: its newly counted events (staged) and its
corrections' signed charges, then the alerts they cross."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from llm_usage.consumers.budget.alerts import alerts_crossed, may_cross
from llm_usage.consumers.budget.counting import CountedEvent, contributions_to
from llm_usage.domain.budgets import budget_horizon
from llm_usage.storage.budget_outbox import insert_alerts
from llm_usage.storage.budget_spend import ChargeMove, add_to_counters
from llm_usage.storage.pool import Connection


async def add_and_alert(
    connection: Connection,
    counted: Sequence[CountedEvent],
    moves: Sequence[ChargeMove],
    *,
    now: datetime,
) -> None:
    """Add the staged events (`counted`: the ones the transaction staged and counted) and then
    `moves` to their counters, and insert the alerts they cross, each triggered by the first
    event or correction that reaches its level (events first, in order, then the corrections)."""
    limited = await add_to_counters(
        connection, evaluated_from=budget_horizon(now), staged=bool(counted), moves=moves
    )
    crossing = {key: counter for key, counter in limited.items() if may_cross(counter)}
    if crossing:
        # Which event or correction crossed: on the counters that cross only (a handful in a
        # batch of thousands).
        contributions = contributions_to(crossing, [*counted, *moves])
        await insert_alerts(connection, alerts_crossed(contributions, crossing, emitted_at=now))
