"""`llm-usage consume budget`: the budget consumer as the shared runtime runs it."""

from __future__ import annotations

import asyncpg
import structlog
from prometheus_client import CollectorRegistry

from llm_usage.consumers.budget.correction_waits import correction_waits
from llm_usage.consumers.budget.handler import BudgetCounter
from llm_usage.consumers.budget.holds_sweep import hold_sweeper
from llm_usage.consumers.budget.metrics import BudgetMetrics
from llm_usage.consumers.budget.relay import alert_relay
from llm_usage.consumers.budget.watcher import watch_policies
from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import Settings
from llm_usage.runtime.handler import ConsumerContext, ConsumerSpec
from llm_usage.runtime.process import run_consumer
from llm_usage.storage.pool import connection_from

log = structlog.get_logger(__name__)


async def require_budget_tables(pool: asyncpg.Pool) -> None:
    """Refuse to start against a database without the budget tables."""
    async with connection_from(pool) as connection:
        for table in ("budget_spend", "budget_holds", "budget_corrections"):
            if await connection.fetchval("SELECT to_regclass($1)", table) is None:
                raise ConfigurationError(
                    f"table {table} does not exist in DATABASE_URL's database; "
                    "run `llm-usage migrate` first"
                )


def budget_consumer_spec(settings: Settings, metrics: BudgetMetrics) -> ConsumerSpec:
    """Same topic as the usage consumer, its own group, no dead-letter topic of its own."""

    def make_handler(context: ConsumerContext) -> BudgetCounter:
        return BudgetCounter(
            pool=context.pool,
            clock=context.clock,
            holds=metrics.holds,
            corrections=metrics.corrections,
            correction_wait_seconds=settings.correction_wait_seconds,
        )

    return ConsumerSpec(
        name="budget",
        topic=settings.usage_topic,
        group_id=settings.budget_group_id,
        make_handler=make_handler,
        dead_letter_topic=None,
        check_database=require_budget_tables,
        max_batch=settings.budget_batch(),
        side_tasks=(
            alert_relay(metrics),
            watch_policies,
            hold_sweeper(metrics.holds),
            correction_waits(metrics.corrections),
        ),
    )


async def run_budget_consumer(
    settings: Settings,
    *,
    exit_when_idle: float | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """`llm-usage consume budget`: run until SIGTERM/SIGINT, or until idle that long."""
    registry = registry or CollectorRegistry()
    metrics = BudgetMetrics.create(registry)
    await run_consumer(
        settings,
        budget_consumer_spec(settings, metrics),
        exit_when_idle=exit_when_idle,
        registry=registry,
        # Its own size: the batch's transaction and the side tasks' short queries (it also
        # holds the watcher's LISTEN and the relay's lock connection beside the pool).
        pool_size=settings.budget_database_pool_size,
    )
