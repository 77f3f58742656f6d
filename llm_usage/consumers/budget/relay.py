"""The alert relay: publishes the outbox to the alerts topic, exactly once on the topic.

One relay works at a time (a PostgreSQL advisory lock held on a connection of its own; losing
that connection stops it at once). A relay that takes over first reads the alerts topic from the
offsets recorded at the last marked publish and marks every alert it finds there: an alert the
broker acknowledged before a crash, but that was never marked, is therefore never published a
second time. Then it publishes what is left, in the order the alerts were decided.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import structlog
from aiokafka.structs import TopicPartition

from llm_usage.consumers.budget.metrics import BudgetMetrics
from llm_usage.core.faults import crash_here
from llm_usage.kafka.alert_topic import alert_ids_after
from llm_usage.kafka.clients import new_reader, start_client
from llm_usage.runtime.handler import ConsumerContext, SideTask
from llm_usage.runtime.leadership import Leadership, Lease, lead_while_held
from llm_usage.storage.budget_outbox import (
    ALERTS_CHANNEL,
    PendingAlert,
    mark_published,
    outbox_backlog,
    pending_alerts,
    relay_positions,
)
from llm_usage.storage.pool import connection_from

log = structlog.get_logger(__name__)

# pg_try_advisory_lock key: "llm-usage alert relay" — one relay per database.
RELAY_LOCK_KEY = 0x6C6C6D5F72656C61
PUBLISH_BATCH = 500
_IDLE_POLL_SECONDS = 1.0
_STANDBY_SECONDS = 2.0
FAULT_AFTER_PUBLISH = "crash_after_alert_publish"


def alert_relay(metrics: BudgetMetrics) -> SideTask:
    """The relay as a side task of the budget consumer."""

    async def relay_alerts(context: ConsumerContext) -> None:
        await AlertRelay(context, metrics).run()

    return relay_alerts


class AlertRelay:
    def __init__(self, context: ConsumerContext, metrics: BudgetMetrics) -> None:
        self._context = context
        self._settings = context.settings
        self._topic = context.settings.alerts_topic
        self._stopping = context.stopping
        self._metrics = metrics
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Relay while this replica holds the lock; stand by (trying every 2 s on one kept-open
        connection) while another does; until the worker stops."""
        await lead_while_held(
            Leadership(
                database_url=self._settings.database_url,
                key=RELAY_LOCK_KEY,
                holder="relay",
                leader=self._metrics.relay_leader,
                standby_seconds=_STANDBY_SECONDS,
                paused="Alert relay paused.",
            ),
            self._stopping,
            self._relay_as_leader,
        )

    async def _relay_as_leader(self, lease: Lease) -> None:
        log.info("This replica relays budget alerts.", topic=self._topic)
        # No UNLISTEN afterwards: the lease's connection is closed when the lead ends.
        await lease.connection.add_listener(ALERTS_CHANNEL, self._on_notify)
        await self._mark_what_is_already_on_the_topic()
        while not self._stopping.is_set():
            lease.ensure_held()
            published = await self._publish_pending()
            if published < PUBLISH_BATCH:
                await self._wait_for_work()

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _wait_for_work(self) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait(
                {stop, wake}, timeout=_IDLE_POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
            wake.cancel()
        self._wake.clear()

    async def _publish_pending(self) -> int:
        pool = self._context.pool
        async with connection_from(pool) as connection:
            pending = await pending_alerts(connection, limit=PUBLISH_BATCH)
            count, oldest = await outbox_backlog(connection)
        self._metrics.outbox_backlog.set(count)
        self._metrics.outbox_oldest_age.set(_seconds_since(oldest) if oldest is not None else 0)
        if not pending:
            return 0
        next_offsets = await self._publish(pending)
        crash_here(FAULT_AFTER_PUBLISH)
        async with connection_from(pool) as connection:
            await mark_published(
                connection,
                [alert.alert_id for alert in pending],
                topic=self._topic,
                next_offsets=next_offsets,
            )
        self._observe(pending)
        return len(pending)

    async def _publish(self, pending: list[PendingAlert]) -> dict[int, int]:
        """Send in order and wait for every acknowledgement; return each partition's end."""
        producer = self._context.producer
        sent = [
            await producer.send(self._topic, key=alert.tenant_id.encode(), value=alert.payload)
            for alert in pending
        ]
        next_offsets: dict[int, int] = {}
        for metadata in await asyncio.gather(*sent):
            next_offsets[metadata.partition] = max(
                next_offsets.get(metadata.partition, 0), metadata.offset + 1
            )
        return next_offsets

    def _observe(self, published: list[PendingAlert]) -> None:
        for alert in published:
            self._metrics.alerts_published.labels(alert.level).inc()
            self._metrics.alert_latency.observe(_seconds_since(alert.created_at))
        log.info("Budget alerts published.", count=len(published), topic=self._topic)

    async def _mark_what_is_already_on_the_topic(self) -> None:
        """Read the topic from where the last marked publish ended; mark the alerts found."""
        async with connection_from(self._context.pool) as connection:
            positions = await relay_positions(connection, self._topic)
        partitions = sorted(await self._context.producer.partitions_for(self._topic))
        reader = new_reader(self._settings)
        await start_client(reader, self._settings)
        try:
            found, ends = await alert_ids_after(
                reader, [TopicPartition(self._topic, p) for p in partitions], positions
            )
        finally:
            await reader.stop()
        if found or ends != positions:
            async with connection_from(self._context.pool) as connection:
                await mark_published(connection, found, topic=self._topic, next_offsets=ends)
        if found:
            log.warning(
                "Alerts a previous relay published but did not mark are marked now, not sent "
                "again.",
                count=len(found),
            )


def _seconds_since(moment: datetime) -> float:
    """The age of `moment`, a time the database's `now()` gave: measured on the wall clock,
    never on the worker's clock (which a soak simulates days in the past)."""
    return (datetime.now(UTC) - moment).total_seconds()
