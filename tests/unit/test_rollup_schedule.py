"""The rollup leader's loop: a transient failure is counted and retried, a bug is raised (so the
process shell stops the worker with one line), and a lost lease ends the leadership."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from llm_usage.core.settings import Settings
from llm_usage.domain.reconcile import Drift, DriftKind
from llm_usage.rollup.reconcile import ReconcileReport
from llm_usage.rollup.schedule import RollupScheduler, ScheduleMetrics
from llm_usage.runtime.leadership import Lease, LostLeadershipError
from llm_usage.runtime.probes import HealthState


class LockConnection:
    """Stands in for the lease's connection: open until `closed` is set."""

    def __init__(self) -> None:
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed


class FailingScheduler(RollupScheduler):
    """A scheduler whose every round raises `error` and then asks the worker to stop."""

    def __init__(self, error: BaseException, stopping: asyncio.Event) -> None:
        self.registry = CollectorRegistry()
        self.health = HealthState()
        super().__init__(
            settings=Settings(),
            pool=cast(asyncpg.Pool, None),  # tick() is replaced: no database is reached
            metrics=ScheduleMetrics.create(self.registry),
            health=self.health,
            clock=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
        )
        self.error = error
        self.stopping = stopping
        self.rounds = 0

    async def tick(self) -> None:
        self.rounds += 1
        self.stopping.set()
        raise self.error

    def failures(self) -> float | None:
        return self.registry.get_sample_value("llm_usage_rollup_failures_total")


def lease(connection: LockConnection) -> Lease:
    return Lease(cast(asyncpg.Connection, connection), holder="scheduler")


async def test_a_transient_failure_is_counted_held_and_retried() -> None:
    stopping = asyncio.Event()
    scheduler = FailingScheduler(ConnectionResetError("database restarting"), stopping)
    await scheduler.run_as_leader(lease(LockConnection()), stopping)
    assert scheduler.rounds == 1
    assert scheduler.failures() == 1
    assert scheduler.health.holds == {"rollup": "rollup failed: ConnectionResetError"}


async def test_a_bug_is_raised_not_retried() -> None:
    stopping = asyncio.Event()
    scheduler = FailingScheduler(ZeroDivisionError("a bug"), stopping)
    with pytest.raises(ZeroDivisionError):
        await scheduler.run_as_leader(lease(LockConnection()), stopping)
    assert scheduler.failures() == 0


async def test_a_closed_lock_connection_ends_the_leadership() -> None:
    connection = LockConnection()
    connection.closed = True
    scheduler = FailingScheduler(ZeroDivisionError("never reached"), asyncio.Event())
    with pytest.raises(LostLeadershipError, match="the scheduler's lock connection closed"):
        await scheduler.run_as_leader(lease(connection), asyncio.Event())
    assert scheduler.rounds == 0


NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
DRIFT = Drift(DriftKind.USAGE_TOTAL, (("tenant_id", "t1"),), None, {"requests": 1}, {"requests": 1})


class Reconciles:
    """Stands in for rollup/reconcile.reconcile: records each call; fails while `error` is set."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    async def __call__(self, pool: object, settings: Settings, **kwargs: Any) -> ReconcileReport:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        return ReconcileReport(kwargs["periods"], [DRIFT], 1200, 2.0, 30.0, False)


def scheduler(minutes: float, registry: CollectorRegistry) -> RollupScheduler:
    return RollupScheduler(
        settings=Settings(reconcile_interval_minutes=minutes),
        pool=cast(asyncpg.Pool, None),  # reconcile is replaced: no database is reached
        metrics=ScheduleMetrics.create(registry),
        health=HealthState(),
        clock=lambda: NOW,
    )


@pytest.fixture
def reconciles(monkeypatch: pytest.MonkeyPatch) -> Reconciles:
    fake = Reconciles()
    monkeypatch.setattr("llm_usage.rollup.schedule.reconcile", fake)
    return fake


async def test_reconcile_runs_for_this_and_last_month_once_per_interval(
    reconciles: Reconciles,
) -> None:
    registry = CollectorRegistry()
    leader = scheduler(60, registry)
    before = registry.get_sample_value("llm_usage_reconcile_drifts", {"kind": "usage_total"})
    assert before == 0  # every kind present before the first run
    await leader.reconcile_if_due(NOW)
    await leader.reconcile_if_due(NOW + timedelta(minutes=59))
    assert [call["periods"] for call in reconciles.calls] == [["2026-10", "2026-11"]]
    assert reconciles.calls[0]["confirm_seconds"] == 30
    assert reconciles.calls[0]["read_topic"] is False
    assert registry.get_sample_value("llm_usage_reconcile_drifts", {"kind": "usage_total"}) == 1
    assert registry.get_sample_value("llm_usage_reconcile_drifts", {"kind": "hold_ledger"}) == 0
    assert registry.get_sample_value("llm_usage_reconcile_events_read_total") == 1200
    assert registry.get_sample_value("llm_usage_reconcile_duration_seconds_count") == 1
    assert registry.get_sample_value("llm_usage_reconcile_last_success_timestamp_seconds")
    await leader.reconcile_if_due(NOW + timedelta(minutes=60))
    assert len(reconciles.calls) == 2


async def test_a_failed_reconcile_is_logged_and_tried_again_later_never_raised(
    reconciles: Reconciles,
) -> None:
    registry = CollectorRegistry()
    leader = scheduler(60, registry)
    reconciles.error = ConnectionResetError("database restarting")
    await leader.reconcile_if_due(NOW)
    assert registry.get_sample_value("llm_usage_reconcile_last_success_timestamp_seconds") == 0
    reconciles.error = None
    await leader.reconcile_if_due(NOW + timedelta(minutes=4))
    assert len(reconciles.calls) == 1
    await leader.reconcile_if_due(NOW + timedelta(minutes=5))
    assert len(reconciles.calls) == 2
    assert registry.get_sample_value("llm_usage_reconcile_last_success_timestamp_seconds")


async def test_an_interval_of_0_never_reconciles_and_hourly_is_the_default(
    reconciles: Reconciles,
) -> None:
    registry = CollectorRegistry()
    await scheduler(0, registry).reconcile_if_due(NOW)
    assert reconciles.calls == []
    assert Settings().reconcile_interval_minutes == 60
    # No success is ever recorded: NaN, so that LLMUsageReconcileStale compares false.
    stale = registry.get_sample_value("llm_usage_reconcile_last_success_timestamp_seconds")
    assert stale is not None
    assert math.isnan(stale)


async def test_a_replica_that_stops_leading_reports_no_drift_of_its_own(
    reconciles: Reconciles,
) -> None:
    registry = CollectorRegistry()
    leader = scheduler(60, registry)
    await leader.reconcile_if_due(NOW)
    drifts = {"kind": "usage_total"}
    assert registry.get_sample_value("llm_usage_reconcile_drifts", drifts) == 1
    connection = LockConnection()
    connection.closed = True
    with pytest.raises(LostLeadershipError):
        await leader.run_as_leader(lease(connection), asyncio.Event())
    assert registry.get_sample_value("llm_usage_reconcile_drifts", drifts) == 0
