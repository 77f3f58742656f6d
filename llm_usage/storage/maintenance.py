"""What `llm-usage maintain` does to the database, as the schema owner, on a schedule.

Each step is its own short transaction, so that a run stopped half-way leaves nothing to undo
and the next run carries on. `llm-usage maintain` runs them under the migrations' advisory lock,
after the months past retention are retired (llm_usage/archive/retention.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

from llm_usage.domain.budgets import budget_horizon
from llm_usage.domain.periods import utc_day
from llm_usage.storage.budget_pruning import prune_budget_periods
from llm_usage.storage.partitions import create_partitions
from llm_usage.storage.pool import Connection

WINDOW_SLICES = 16

_PRUNE_SLICE = """
    DELETE FROM {slice}
    WHERE first_seen_at < now() - make_interval(hours => $1)
"""
_PRUNE_LEGACY_COUNTED = """
    DELETE FROM budget_counted_legacy
    WHERE counted_at < now() - make_interval(hours => $1)
"""


@dataclass
class MaintenanceReport:
    """What one run did."""

    months_created: list[date] = field(default_factory=list)
    window_ids_pruned: int = 0
    legacy_counted_ids_pruned: int = 0
    budget_rows_pruned: int = 0

    def lines(self) -> list[str]:
        created = ", ".join(f"{m:%Y-%m}" for m in self.months_created) or "none"
        return [
            f"months created: {created}",
            f"ids older than the window pruned: {self.window_ids_pruned}",
            f"ids counted before the window existed, pruned: {self.legacy_counted_ids_pruned}",
            f"budget counters and published alerts of periods past the horizon, pruned: "
            f"{self.budget_rows_pruned}",
        ]


def window_slice(index: int) -> str:
    """`usage_event_ids_p07`: one of the id window's hash slices."""
    return f"usage_event_ids_p{index:02d}"


def _affected(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


async def prune_id_window(connection: Connection, *, window_hours: int) -> int:
    """Forget ids first seen more than `window_hours` ago, one hash slice a statement (a scan
    of a sixteenth of the window each, no index on the time to keep up)."""
    pruned = 0
    for index in range(WINDOW_SLICES):
        status = await connection.execute(
            _PRUNE_SLICE.format(slice=window_slice(index)), window_hours
        )
        pruned += _affected(status)
    return pruned


async def maintain(
    connection: Connection, *, now: datetime, retention_months: int, window_hours: int
) -> MaintenanceReport:
    """The storage's own steps of a run: the months ahead, the id window pruned, the ids counted
    before it existed forgotten once older than the window, the budget periods past the horizon
    pruned. The caller holds the schema owner's lock (`lock_migrations`)."""
    today = utc_day(now)
    report = MaintenanceReport()
    report.months_created = await create_partitions(
        connection, today=today, retention_months=retention_months
    )
    report.window_ids_pruned = await prune_id_window(connection, window_hours=window_hours)
    report.legacy_counted_ids_pruned = _affected(
        await connection.execute(_PRUNE_LEGACY_COUNTED, window_hours)
    )
    report.budget_rows_pruned = await prune_budget_periods(connection, before=budget_horizon(now))
    return report
