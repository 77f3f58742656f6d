"""The budget consumer's parked corrections, retried (design §6): a correction waits until the
usage consumer has judged it and its event is counted; an `unknown` verdict drops it.

Every `CORRECTION_RETRY_SECONDS` each replica takes the waiting corrections of up to
`TENANTS_PER_RETRY` tenants (storage/corrections.py) at a time, one transaction each: their
correction buckets first (the lock order of the batches; only those free, without waiting: a
bucket a batch holds is tried again next round), then their parked rows that no other replica
holds (`SKIP LOCKED`), then the same steps as a batch.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from llm_usage.consumers.budget.corrections import (
    BUDGET,
    DEFERRED,
    Received,
    apply_corrections,
)
from llm_usage.domain.corrections import Correction
from llm_usage.runtime.correction_metrics import CorrectionMetrics
from llm_usage.runtime.handler import ConsumerContext, SideTask
from llm_usage.runtime.retry import is_transient, sleep_unless_stopping
from llm_usage.schemas.decoding import decode_usage_topic_record
from llm_usage.storage.corrections import (
    Waiting,
    claim_waits,
    forget_waits,
    try_lock_correction_buckets,
    wait_summary,
    waiting_events,
    waiting_tenants,
)
from llm_usage.storage.flavour import citus_installed
from llm_usage.storage.pool import Connection, connection_from

log = structlog.get_logger(__name__)


def correction_waits(metrics: CorrectionMetrics) -> SideTask:
    """The retries of parked corrections as a side task of the budget consumer."""

    async def retry_until_stopped(context: ConsumerContext) -> None:
        sleep = sleep_unless_stopping(context.stopping)
        while not context.stopping.is_set():
            await retry_once(context, metrics)
            await sleep(context.settings.correction_retry_seconds)

    return retry_until_stopped


async def retry_once(context: ConsumerContext, metrics: CorrectionMetrics) -> bool:
    """One round over every tenant with parked corrections; False when it failed on a transient
    error (the next round tries again)."""
    try:
        async with connection_from(context.pool) as connection:
            topic = context.settings.usage_topic  # only the records this replica consumes
            citus = await citus_installed(connection)
            for tenant_ids in await waiting_tenants(connection, BUDGET, topic=topic):
                async with connection.transaction():
                    results = await _retry_tenants(
                        connection, tenant_ids, now=context.clock(), topic=topic, citus=citus
                    )
                for result in results:  # committed
                    if result != DEFERRED:  # counted once, when it was parked
                        metrics.count(result)
            summary = await wait_summary(connection, BUDGET, topic=topic)
    except Exception as error:
        if not is_transient(error):
            raise
        log.warning(
            "Retrying parked corrections failed; the next round tries again.", error=f"{error!r}"
        )
        return False
    now = context.clock()
    metrics.waiting.labels(metrics.consumer).set(summary.waiting)
    oldest = summary.oldest_first_seen_at
    age = (now - oldest).total_seconds() if oldest is not None else 0.0
    metrics.oldest_wait.labels(metrics.consumer).set(max(age, 0.0))
    return True


async def _retry_tenants(
    connection: Connection,
    tenant_ids: list[str],
    *,
    now: datetime,
    topic: str | None = None,
    citus: bool = False,
) -> list[str]:
    """Try the tenants' parked corrections that no other replica is trying; what became of
    each."""
    parked = await waiting_events(connection, BUDGET, tenant_ids, topic=topic)
    events = await try_lock_correction_buckets(connection, parked)
    # A row parked since `parked` was read, or whose bucket a batch holds, is left to the next
    # round: its bucket is not held.
    claimed = [
        waiting
        for waiting in await claim_waits(connection, BUDGET, tenant_ids, topic=topic, citus=citus)
        if (waiting.tenant_id, waiting.gateway_request_id) in events
    ]
    received: list[Received] = []
    unreadable: list[tuple[str, str]] = []
    for waiting in claimed:
        correction = _decoded(waiting, now=now)
        if correction is None:
            unreadable.append((waiting.tenant_id, waiting.correction_id))
        else:
            received.append(Received(correction))
    results = await apply_corrections(connection, received, now=now, citus=citus)
    resolved = [
        item.correction.key
        for item, result in zip(received, results, strict=True)
        if result != DEFERRED
    ]
    await forget_waits(connection, BUDGET, resolved + unreadable)
    return results


def _decoded(row: Waiting, *, now: datetime) -> Correction | None:
    """The parked record as the correction it was when parked (None, logged: it no longer
    decodes as one, e.g. after a downgrade)."""
    decoded = decode_usage_topic_record(row.value, now=now)
    if isinstance(decoded, Correction):
        return decoded
    log.error(
        "A parked correction no longer decodes as one; it is dropped.",
        tenant_id=row.tenant_id,
        correction_id=row.correction_id,
        topic=row.topic,
        partition=row.partition,
        offset=row.offset,
    )
    return None
