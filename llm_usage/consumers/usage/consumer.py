"""The usage consumer: every `llm_usage_recorded` event stored exactly once in Postgres."""

from __future__ import annotations

import asyncpg
from prometheus_client import CollectorRegistry

from llm_usage.consumers.usage.correction_waits import correction_waits
from llm_usage.consumers.usage.partitions_watch import watch_partitions
from llm_usage.consumers.usage.price_drift import price_drift_counter
from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import Settings
from llm_usage.runtime.correction_metrics import correction_metrics
from llm_usage.runtime.handler import ConsumerContext, ConsumerSpec
from llm_usage.runtime.process import run_consumer
from llm_usage.storage.usage_events import usage_table_exists


async def require_migrated(pool: asyncpg.Pool) -> None:
    """Refuse to start against a database that was never migrated."""
    async with pool.acquire() as connection:
        if not await usage_table_exists(connection):
            raise ConfigurationError(
                "table llm_usage_events does not exist in DATABASE_URL's database; "
                "run `llm-usage migrate` first"
            )


async def run_usage_consumer(
    settings: Settings,
    *,
    exit_when_idle: float | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """`llm-usage consume usage`: run until SIGTERM/SIGINT, or until idle that long."""
    registry = registry or CollectorRegistry()
    await run_consumer(
        settings,
        usage_consumer_spec(settings, registry),
        exit_when_idle=exit_when_idle,
        registry=registry,
    )


def usage_consumer_spec(settings: Settings, registry: CollectorRegistry) -> ConsumerSpec:
    """The usage consumer as the runtime runs it: its topic, group, handler and DLQ."""

    price_drift = price_drift_counter(registry)
    corrections = correction_metrics(registry, "usage")

    def make_handler(context: ConsumerContext) -> UsageRecorder:
        return UsageRecorder(
            pool=context.pool,
            clock=context.clock,
            price_drift=price_drift,
            correction_wait_seconds=context.settings.correction_wait_seconds,
            correction_metrics=corrections,
        )

    return ConsumerSpec(
        name="usage",
        topic=settings.usage_topic,
        group_id=settings.usage_group_id,
        make_handler=make_handler,
        dead_letter_topic=settings.dlq_topic,
        check_database=require_migrated,
        side_tasks=(watch_partitions(registry), correction_waits(corrections)),
    )
