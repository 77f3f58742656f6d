"""A side task of the usage consumer: how many months ahead have a partition, as a gauge.

`llm-usage maintain` (a schedule run as the schema owner) creates the months ahead; it exits
after each run, so the long-running consumer is what tells Prometheus when it has not run.
"""

from __future__ import annotations

import structlog
from prometheus_client import CollectorRegistry, Gauge

from llm_usage.domain.retention import months_ahead
from llm_usage.runtime.handler import ConsumerContext, SideTask
from llm_usage.runtime.retry import is_transient, sleep_unless_stopping
from llm_usage.storage.partitions import attached_months
from llm_usage.storage.pool import connection_from

log = structlog.get_logger(__name__)

_EVERY_SECONDS = 300.0


def watch_partitions(registry: CollectorRegistry) -> SideTask:
    ahead = Gauge(
        "llm_usage_event_partitions_ahead_months",
        "Whole months past the current one with a partition of llm_usage_events (an event "
        "of a month without one waits; below 2, `llm-usage maintain` has not run).",
        registry=registry,
    )

    async def watch_partitions_regularly(context: ConsumerContext) -> None:
        sleep = sleep_unless_stopping(context.stopping)
        while not context.stopping.is_set():
            try:
                async with connection_from(context.pool) as connection:
                    months = await attached_months(connection)
                ahead.set(months_ahead(context.clock().date(), months.newest))
            except Exception as error:
                if not is_transient(error):
                    raise
                log.warning("Reading the event partitions failed; trying later.", error=str(error))
            await sleep(_EVERY_SECONDS)

    return watch_partitions_regularly
