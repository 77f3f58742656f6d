"""`llm-usage rollup schedule`: refresh the current month's preview lines, and run and close
each month once it has ended and the grace has passed. Several replicas may run; one works at a
time (runtime/leadership: losing the lock's connection stops the work at once). It runs as a
side task of the shared process shell, so a bug stops the worker with one line."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llm_usage.core.settings import Settings
from llm_usage.domain.periods import (
    add_months,
    current_period,
    following_period,
    parse_period,
    period_of,
)
from llm_usage.domain.reconcile import DriftKind
from llm_usage.rollup.reconcile import reconcile
from llm_usage.rollup.run import close_month, run_rollup
from llm_usage.runtime.handler import WorkerContext
from llm_usage.runtime.leadership import Leadership, Lease, lead_while_held
from llm_usage.runtime.probes import HealthState
from llm_usage.runtime.process import run_beside, worker_process
from llm_usage.runtime.retry import is_transient, sleep_unless_stopping
from llm_usage.storage.invoice_lines import closed_periods, first_month_with_usage_before
from llm_usage.storage.pool import connection_from

log = structlog.get_logger(__name__)
T = TypeVar("T")

SCHEDULE_LOCK_KEY = 0x6C6C6D5F73636864
_TICK_SECONDS = 30.0
_RETRY_SECONDS = 60.0
_STANDBY_SECONDS = 5.0
# A scheduled reconcile reads lagging candidates again this much later (design §10.3).
RECONCILE_CONFIRM_SECONDS = 30.0
_RECONCILE_RETRY = timedelta(minutes=5)


@dataclass(frozen=True)
class ScheduleMetrics:
    last_success: Gauge
    duration: Histogram
    lines_written: Counter
    months_closed: Counter
    failures: Counter
    leader: Gauge
    reconcile_drifts: Gauge
    reconcile_last_success: Gauge
    reconcile_duration: Histogram
    reconcile_events_read: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ScheduleMetrics:
        return cls(
            last_success=Gauge(
                "llm_usage_rollup_last_success_timestamp_seconds",
                "When a rollup run (preview or close) last succeeded, Unix time.",
                registry=registry,
            ),
            duration=Histogram(
                "llm_usage_rollup_run_duration_seconds",
                "Duration of one rollup run.",
                buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                registry=registry,
            ),
            lines_written=Counter(
                "llm_usage_rollup_lines_written_total",
                "Invoice lines stored by rollup runs.",
                registry=registry,
            ),
            months_closed=Counter(
                "llm_usage_rollup_months_closed_total", "Months closed.", registry=registry
            ),
            failures=Counter(
                "llm_usage_rollup_failures_total",
                "Rollup runs that failed (retried; a month is never left half-written).",
                registry=registry,
            ),
            leader=Gauge(
                "llm_usage_rollup_scheduler_leader",
                "1 on the one replica that runs the schedule, 0 on the others.",
                registry=registry,
            ),
            reconcile_drifts=_every_kind_at_zero(
                Gauge(
                    "llm_usage_reconcile_drifts",
                    "Drifts the last reconcile found (confirmed), by kind.",
                    ["kind"],
                    registry=registry,
                )
            ),
            reconcile_last_success=Gauge(
                "llm_usage_reconcile_last_success_timestamp_seconds",
                "When a scheduled reconcile last ran to its end, Unix time.",
                registry=registry,
            ),
            reconcile_duration=Histogram(
                "llm_usage_reconcile_duration_seconds",
                "Duration of one scheduled reconcile (both months, the confirmation included).",
                buckets=(1, 5, 10, 30, 60, 120, 300),
                registry=registry,
            ),
            reconcile_events_read=Counter(
                "llm_usage_reconcile_events_read",
                "Events the scheduled reconciles read.",
                registry=registry,
            ),
        )


def _every_kind_at_zero(gauge: Gauge) -> Gauge:
    for kind in DriftKind:
        gauge.labels(kind.value).set(0)
    return gauge


def months_due_for_closing(
    *, first_month_with_usage: str | None, closed: set[str], now: datetime, grace: timedelta
) -> list[str]:
    """Months to close now, oldest first: every month from the first with usage that has ended
    at least `grace` ago and is not closed yet (months close in order, with or without usage)."""
    if first_month_with_usage is None:
        return []
    due, month = [], first_month_with_usage
    while month < current_period(now):
        ends = datetime.combine(parse_period(following_period(month)), datetime.min.time(), UTC)
        if now < ends + grace:
            break
        if month not in closed:
            due.append(month)
        month = following_period(month)
    return due


class RollupScheduler:
    def __init__(
        self,
        *,
        settings: Settings,
        pool: asyncpg.Pool,
        metrics: ScheduleMetrics,
        health: HealthState,
        clock: Callable[[], datetime],
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._health = health
        self._clock = clock
        self._next_preview: datetime | None = None
        self._next_reconcile: datetime | None = None
        if settings.reconcile_interval_minutes <= 0:
            # Off: no success will ever be recorded, and LLMUsageReconcileStale must not fire
            # for that (NaN compares false in its expression).
            metrics.reconcile_last_success.set(math.nan)

    async def tick(self) -> None:
        """One round of work as the leader: close what is due, refresh the preview if due."""
        now = self._clock()
        grace = timedelta(hours=self._settings.rollup_close_grace_hours)
        async with connection_from(self._pool) as connection:
            closed = set(await closed_periods(connection))
            first_with_usage = await first_month_with_usage_before(
                connection, parse_period(current_period(now))
            )
        for month in months_due_for_closing(
            first_month_with_usage=first_with_usage,
            closed=closed,
            now=now,
            grace=grace,
        ):
            result = await self._timed(close_month(self._pool, period=month, now=now))
            self._metrics.months_closed.inc()
            self._metrics.lines_written.inc(len(result.lines))
            log.info("Month closed.", period=month, lines=len(result.lines))
        if self._next_preview is None or now >= self._next_preview:
            result = await self._timed(run_rollup(self._pool, period=current_period(now)))
            self._metrics.lines_written.inc(len(result.lines))
            self._next_preview = now + timedelta(minutes=self._settings.rollup_preview_minutes)
            log.info("Preview lines refreshed.", period=result.period, lines=len(result.lines))
        await self.reconcile_if_due(now)

    async def reconcile_if_due(self, now: datetime) -> None:
        """Reconcile this month and the previous one every RECONCILE_INTERVAL_MINUTES (0: never).
        A failure is logged and tried again 5 minutes later: it never stops the rollup."""
        interval = self._settings.reconcile_interval_minutes
        if interval <= 0 or (self._next_reconcile is not None and now < self._next_reconcile):
            return
        this_month = current_period(now)
        periods = [period_of(add_months(parse_period(this_month), -1)), this_month]
        started = time.perf_counter()
        try:
            report = await reconcile(
                self._pool,
                self._settings,
                periods=periods,
                confirm_seconds=RECONCILE_CONFIRM_SECONDS,
                # The schedule's replicas have no Kafka access: the topic's kinds are the
                # command's (`llm-usage reconcile`) and the soak's.
                read_topic=False,
                now=now,
            )
        except Exception as error:  # noqa: BLE001 - logged; the rollup goes on
            self._next_reconcile = now + _RECONCILE_RETRY
            log.error(
                "Reconcile failed; it will be tried again.",
                error=f"{type(error).__name__}: {error}",
                retry_in_seconds=_RECONCILE_RETRY.total_seconds(),
            )
            return
        self._next_reconcile = now + timedelta(minutes=interval)
        for kind, count in report.by_kind.items():
            self._metrics.reconcile_drifts.labels(kind).set(count)
        self._metrics.reconcile_events_read.inc(report.events)
        self._metrics.reconcile_duration.observe(time.perf_counter() - started)
        self._metrics.reconcile_last_success.set(time.time())
        for drift in report.drifts:
            log.error("Reconcile found a drift.", drift=drift.text())
        log.info("Reconciled.", **report.summary())

    async def _timed(self, work: Awaitable[T]) -> T:
        started = time.perf_counter()
        result = await work
        self._metrics.duration.observe(time.perf_counter() - started)
        self._metrics.last_success.set(time.time())
        return result

    async def run(self, stopping: asyncio.Event) -> None:
        """Lead while this replica holds the lease, stand by while another does (trying every
        5 s on one kept-open connection), until `stopping`. Transient failures are waited out;
        anything else is raised (a bug)."""

        async def lead(lease: Lease) -> None:
            await self.run_as_leader(lease, stopping)

        def tried(_leading: bool) -> None:
            self._health.started()  # a standby replica is ready to take over

        await lead_while_held(
            Leadership(
                database_url=self._settings.database_url,
                key=SCHEDULE_LOCK_KEY,
                holder="scheduler",
                leader=self._metrics.leader,
                standby_seconds=_STANDBY_SECONDS,
                retry_seconds=_STANDBY_SECONDS,
                paused="Rollup schedule paused.",
            ),
            stopping,
            lead,
            on_try=tried,
        )

    async def run_as_leader(self, lease: Lease, stopping: asyncio.Event) -> None:
        """A round of work every 30 s while the lease holds. A run that failed transiently
        rolled back and is retried a minute later; anything else is raised."""
        self._health.started()
        log.info("This replica runs the rollup schedule.")
        try:
            await self._lead(lease, stopping)
        finally:
            # Only the leader's drift gauges count (LLMUsageReconcileDrift sums the replicas').
            _every_kind_at_zero(self._metrics.reconcile_drifts)

    async def _lead(self, lease: Lease, stopping: asyncio.Event) -> None:
        sleep = sleep_unless_stopping(stopping)
        while not stopping.is_set():
            lease.ensure_held()
            self._health.progressed()
            try:
                await self.tick()
            except Exception as error:
                if not is_transient(error):
                    raise
                self._metrics.failures.inc()
                self._health.hold("rollup", f"rollup failed: {type(error).__name__}")
                log.error(
                    "Rollup failed; it will be retried.", error=f"{type(error).__name__}: {error}"
                )
                await sleep(_RETRY_SECONDS)
                continue
            self._health.release("rollup")
            await sleep(_TICK_SECONDS)


def scheduler_health() -> HealthState:
    """The schedule's probes: ready once it has led or stood by; alive while its event loop
    answers (no tick deadline: a month-end tick at 10,000 tenants may rightly take minutes)."""
    return HealthState(starting_reason="waiting for the first rollup", stall_after_seconds=None)


def rollup_schedule(metrics: ScheduleMetrics) -> Callable[[WorkerContext], Awaitable[None]]:
    """The schedule as a side task of the process shell: a bug in it stops the worker."""

    async def run_rollup_schedule(context: WorkerContext) -> None:
        scheduler = RollupScheduler(
            settings=context.settings,
            pool=context.pool,
            metrics=metrics,
            health=context.health,
            clock=context.clock,
        )
        await scheduler.run(context.stopping)

    return run_rollup_schedule


async def run_schedule(settings: Settings, *, registry: CollectorRegistry | None = None) -> None:
    """Run until SIGTERM/SIGINT: the leader works, the others wait to take over."""
    registry = registry or CollectorRegistry()
    metrics = ScheduleMetrics.create(registry)
    health = scheduler_health()
    async with worker_process(settings, registry=registry, health=health, pool_size=2) as context:
        await run_beside(
            context.stopping.wait(),
            [rollup_schedule(metrics)],
            context,
            worker="rollup schedule",
        )
