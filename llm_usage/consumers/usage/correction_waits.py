"""A side task of the usage consumer (design §5.2): the corrections that came before their event
are tried again every `CORRECTION_RETRY_SECONDS`; one whose event is still not stored
`CORRECTION_WAIT_SECONDS` after it was first seen goes to the dead-letter topic as
`unknown_event`, with its original key and bytes, and its verdict is `unknown`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import structlog
from aiokafka.structs import ConsumerRecord

from llm_usage.consumers.usage.corrections import (
    CONSUMER,
    Copy,
    apply_corrections,
    move_aggregates,
)
from llm_usage.domain.corrections import Correction, Verdict
from llm_usage.runtime.correction_metrics import CorrectionMetrics
from llm_usage.runtime.dead_letters import DeadLetterSink, KafkaDeadLetterSink
from llm_usage.runtime.handler import ConsumerContext, DeadLetter, Record, SideTask
from llm_usage.runtime.retry import is_transient, sleep_unless_stopping
from llm_usage.schemas.dead_letter import DeadLetterReason
from llm_usage.schemas.decoding import decode_usage_topic_record
from llm_usage.storage.corrections import (
    CorrectionWrite,
    Waiting,
    claim_waits,
    forget_waits,
    try_lock_correction_buckets,
    wait_summary,
    waiting_events,
    waiting_tenants,
    write_verdicts,
)
from llm_usage.storage.flavour import citus_installed
from llm_usage.storage.pool import connection_from

log = structlog.get_logger(__name__)


def correction_waits(metrics: CorrectionMetrics) -> SideTask:
    """The retries of waiting corrections as a side task of the usage consumer."""

    async def retry_waiting_corrections(context: ConsumerContext) -> None:
        settings = context.settings
        sink = KafkaDeadLetterSink(context.producer, settings.dlq_topic)
        sleep = sleep_unless_stopping(context.stopping)
        while not context.stopping.is_set():
            try:
                await retry_round(
                    context.pool,
                    sink,
                    now=context.clock(),
                    wait_seconds=settings.correction_wait_seconds,
                    metrics=metrics,
                    topic=settings.usage_topic,
                )
            except Exception as error:
                if not is_transient(error):
                    raise
                log.warning(
                    "Trying the waiting corrections failed; the next round tries again.",
                    error=f"{error!r}",
                )
            await sleep(settings.correction_retry_seconds)

    return retry_waiting_corrections


@dataclass
class RoundResult:
    """What one round did: counts by result (applied, superseded, duplicate, conflict,
    unknown) and the dead letters it published."""

    results: Counter[str] = field(default_factory=Counter)
    dead_letters: list[DeadLetter] = field(default_factory=list)


async def retry_round(
    pool: asyncpg.Pool,
    sink: DeadLetterSink,
    *,
    now: datetime,
    wait_seconds: float,
    metrics: CorrectionMetrics | None = None,
    topic: str | None = None,
) -> RoundResult:
    """One round over every tenant with waiting corrections (of records of `topic`, the one
    the replica consumes; None: every topic), one transaction a group of tenants
    (`waiting_tenants`)."""
    result = RoundResult()
    async with connection_from(pool) as connection:
        groups = await waiting_tenants(connection, CONSUMER, topic=topic)
        citus = await citus_installed(connection)
    for tenants in groups:
        async with connection_from(pool) as connection, connection.transaction():
            events = await waiting_events(connection, CONSUMER, tenants, topic=topic)
            # Only the buckets no batch holds, without waiting (the others: next round).
            locked = await try_lock_correction_buckets(connection, events)
            waits = [
                w
                for w in await claim_waits(connection, CONSUMER, tenants, topic=topic, citus=citus)
                if _event(w) in locked
            ]
            copies = [copy for copy in map(_copy, waits) if copy is not None]
            if not copies:
                continue
            applied = await apply_corrections(
                connection, copies, now=now, wait_seconds=wait_seconds, citus=citus
            )
            await move_aggregates(connection, [], applied)
            deadlines = {(w.tenant_id, w.correction_id): w.wait_until for w in waits}
            expired = [(r, c) for r, c in applied.waiting if deadlines[c.key] <= now]
            letters = [
                *applied.outcome.dead_letters,
                *(_unknown(r, c, wait_seconds) for r, c in expired),
            ]
            # Published while the rows are locked, before the verdict commits: a crash in
            # between publishes them again next round (the DLQ is at least once).
            await sink.publish(letters, failed_at=now)
            await write_verdicts(
                connection, [CorrectionWrite(c, Verdict.UNKNOWN) for _, c in expired]
            )
            await forget_waits(connection, CONSUMER, [c.key for _, c in expired])
        applied.results.pop("deferred", None)
        result.results.update(applied.results)
        result.results["unknown"] += len(expired)
        result.dead_letters.extend(letters)
        if metrics is not None:
            for name, n in applied.results.items():
                metrics.count(name, n)
            if expired:
                metrics.count("unknown", len(expired))
    if metrics is not None:
        async with connection_from(pool) as connection:
            summary = await wait_summary(connection, CONSUMER, topic=topic)
        metrics.waiting.labels(metrics.consumer).set(summary.waiting)
        oldest = summary.oldest_first_seen_at
        metrics.oldest_wait.labels(metrics.consumer).set(
            0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        )
    return result


def _event(wait: Waiting) -> tuple[str, str]:
    return (wait.tenant_id, wait.gateway_request_id)


def _copy(wait: Waiting) -> Copy | None:
    """The waiting record as the consumer read it, and its correction decoded again."""
    record: Record = ConsumerRecord(
        topic=wait.topic,
        partition=wait.partition,
        offset=wait.offset,
        timestamp=0,
        timestamp_type=0,
        key=wait.key,
        value=wait.value,
        checksum=None,
        serialized_key_size=len(wait.key or b""),
        serialized_value_size=len(wait.value),
        headers=(),
    )
    decoded = decode_usage_topic_record(wait.value, now=wait.first_seen_at)
    if not isinstance(decoded, Correction):  # it was one when parked: the same bytes
        log.error(
            "A waiting record no longer decodes as a correction; left waiting.",
            topic=wait.topic,
            partition=wait.partition,
            offset=wait.offset,
        )
        return None
    return (record, decoded)


def _unknown(record: Record, correction: Correction, wait_seconds: float) -> DeadLetter:
    detail = (
        f"no event gateway_request_id {correction.gateway_request_id!r} of tenant "
        f"{correction.tenant_id!r} was stored within {wait_seconds:g} s of the correction"
    )
    return DeadLetter(record, DeadLetterReason.UNKNOWN_EVENT, detail)
