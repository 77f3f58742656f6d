"""The process shell's watch over side tasks: one dying stops the worker in order, with one line
saying why; a stop asked for ends the main work first, then the side tasks."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime
from typing import cast

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from llm_usage.core.settings import Settings
from llm_usage.runtime.handler import WorkerContext
from llm_usage.runtime.probes import HealthState
from llm_usage.runtime.process import Stopping, WorkerFailedError, run_beside, seconds_left


def context() -> WorkerContext:
    return WorkerContext(
        settings=Settings(),
        pool=cast(asyncpg.Pool, None),  # no side task here touches the database
        registry=CollectorRegistry(),
        health=HealthState(),
        stopping=asyncio.Event(),
        clock=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
    )


async def until_stopped(context: WorkerContext) -> None:
    await context.stopping.wait()


async def test_a_side_task_that_raises_stops_the_main_work_and_the_worker_with_one_line() -> None:
    order: list[str] = []
    worker = context()

    async def main() -> str:
        await worker.stopping.wait()
        order.append("main finished")
        return "done"

    async def broken(_: WorkerContext) -> None:
        raise ValueError("a bug")

    async def waits(context: WorkerContext) -> None:
        await context.stopping.wait()
        order.append("side task stopped")

    with capture_logs() as logs, pytest.raises(WorkerFailedError) as failed:
        await run_beside(main(), [broken, waits], worker, worker="test worker")
    assert str(failed.value) == (
        "the test worker stopped because a side task failed: ValueError: a bug"
    )
    assert order == ["main finished", "side task stopped"]
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert [(e["event"], e["task"]) for e in errors] == [
        ("A side task stopped; stopping the worker.", "broken")
    ]


async def test_a_side_task_that_returns_before_the_stop_stops_the_worker() -> None:
    worker = context()

    async def returns(_: WorkerContext) -> None:
        return None

    with pytest.raises(WorkerFailedError, match="returned before the worker was asked to stop"):
        await run_beside(worker.stopping.wait(), [returns], worker, worker="test worker")


async def test_a_stop_ends_the_main_work_first_then_the_side_tasks_and_returns_its_result() -> None:
    order: list[str] = []
    worker = context()

    async def main() -> int:
        await worker.stopping.wait()
        order.append("main")
        return 7

    async def side(context: WorkerContext) -> None:
        await context.stopping.wait()
        await asyncio.sleep(0.01)
        order.append("side")

    asyncio.get_running_loop().call_later(0.05, worker.stopping.set)
    assert await run_beside(main(), [side, until_stopped], worker, worker="test worker") == 7
    assert order == ["main", "side"]


async def test_main_work_and_side_tasks_that_ignore_the_stop_are_cancelled_at_the_deadline() -> (
    None
):
    worker = context()
    stopping = Stopping(deadline_seconds=1.0)
    worker = dataclasses.replace(worker, stopping=stopping)
    cancelled: list[str] = []

    async def main() -> int:
        try:
            await asyncio.sleep(3600)  # a commit that never returns
        except asyncio.CancelledError:
            cancelled.append("main")
            raise
        return 7

    async def stubborn(_: WorkerContext) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append("side")
            raise

    asyncio.get_running_loop().call_later(0.05, stopping.set)
    started = time.monotonic()
    with capture_logs() as logs:
        assert await run_beside(main(), [stubborn], worker, worker="test worker") is None
    took = time.monotonic() - started
    assert 0.6 < took < 1.0, took  # both by 65 % of the deadline from the stop, not later
    assert cancelled == ["main", "side"]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "The main work did not stop within its share of the shutdown deadline; abandoned "
        "(what had not landed is read again by the next owner)."
    ]


def test_the_deadline_is_measured_from_the_first_stop() -> None:
    stopping = Stopping(deadline_seconds=10.0)
    assert stopping.seconds_left(0.5) == pytest.approx(5.0, abs=0.1)  # not begun: from now
    stopping.set()
    began = stopping.seconds_left()
    time.sleep(0.05)
    stopping.set()  # a second stop does not move the deadline
    assert stopping.seconds_left() < began
    assert seconds_left(asyncio.Event(), 0.5, otherwise=3.0) == 3.0
