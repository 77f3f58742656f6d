"""The rollup leader's loop: a transient failure is counted and retried, a bug is raised (so the
process shell stops the worker with one line), and a lost lease ends the leadership."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import cast

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from llm_usage.core.settings import Settings
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
