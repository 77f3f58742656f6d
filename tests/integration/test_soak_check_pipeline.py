"""The soak checker against a real PostgreSQL and Kafka: a small pipeline run through the real
handlers passes every check, and breaking one thing fails exactly the check that watches it."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from llm_usage.cli.soak.check import TopicUnreadableError, check_soak, read_committed
from llm_usage.cli.soak.ledger import Ledger, SentEvent
from llm_usage.cli.soak.timeline import CheckReport
from llm_usage.consumers.budget.handler import BudgetCounter
from llm_usage.consumers.runtime.dead_letters import publish_dead_letters
from llm_usage.consumers.runtime.outcome import BatchOutcome
from llm_usage.consumers.usage import UsageRecorder
from llm_usage.core.clock import SimulatedClock
from llm_usage.deploy.topics import ensure_topics
from llm_usage.rollup.run import close_month
from llm_usage.schemas.budget import ScopeType
from llm_usage.schemas.budget_policy import BudgetPolicy
from llm_usage.schemas.dead_letter import DeadLetterReason, dead_letter_headers
from llm_usage.storage.budget_outbox import pending_alerts
from llm_usage.storage.budget_policies import set_policy
from llm_usage.storage.migrate import migrate
from tests.integration.pipeline import (
    PipelineTopics,
    create_pipeline_topics,
    encode,
    unique,
    usage_event,
)
from tests.records import consumer_record

# The handlers' "now": no event may be more than 5 minutes after it.
NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)
TENANT = "t1"


@pytest.fixture
async def soak_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A migrated database of the test's own: the checker reads whole tables."""
    name = f"soak_check_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    pool = await asyncpg.create_pool(_with_database(database_url, name), min_size=1, max_size=3)
    assert pool is not None
    async with pool.acquire() as connection:
        await migrate(connection)
    yield pool
    await pool.close()
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


def _with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` (works for host:port and unix-socket URLs)."""
    scheme, _, rest = url.partition("://")
    authority, _, tail = rest.partition("/")
    _, query_mark, query = tail.partition("?")
    return f"{scheme}://{authority}/{name}" + (f"?{query}" if query_mark else "")


def event(
    request_id: str, charge: str, at: str, *, deployment: str | None = "dep-1", **fields: Any
) -> dict[str, Any]:
    return usage_event(
        TENANT,
        gateway_request_id=request_id,
        deployment_id=deployment,
        user_id=fields.pop("user_id", None),
        customer_charge_usd=charge,
        occurred_at=at,
        **fields,
    )


def sent(value: dict[str, Any]) -> SentEvent:
    return SentEvent(
        gateway_request_id=value["gateway_request_id"],
        tenant_id=value["tenant_id"],
        deployment_id=value["deployment_id"],
        user_id=value.get("user_id"),
        agent_id=value.get("agent_id"),
        customer_charge_usd=Decimal(value["customer_charge_usd"]),
        input_tokens=value["input_tokens"],
        output_tokens=value["output_tokens"],
        occurred_at=datetime.fromisoformat(value["occurred_at"]),
        acked_at=0.0,
    )


async def land(pool: asyncpg.Pool, values: Sequence[bytes], first_offset: int) -> BatchOutcome:
    """One batch through the usage consumer's and the budget consumer's own handlers."""
    records = [consumer_record(v, offset=first_offset + n) for n, v in enumerate(values)]
    outcome = await UsageRecorder(pool=pool, clock=lambda: NOW).record_batch(records)
    await BudgetCounter(pool=pool, clock=lambda: NOW).record_batch(records)
    return outcome


async def set_policies(pool: asyncpg.Pool) -> None:
    """The tenant's own limit, and a deployment limit lowered from an unreachable one."""
    async with pool.acquire() as connection:
        for policy in (
            BudgetPolicy(
                tenant_id=TENANT,
                scope_type=ScopeType.TENANT,
                scope_id=TENANT,
                daily_limit_usd=Decimal(100),
                monthly_limit_usd=Decimal(10),
                warn_threshold_pct=50,
            ),
            BudgetPolicy(
                tenant_id=TENANT,
                scope_type=ScopeType.DEPLOYMENT,
                scope_id="dep-1",
                monthly_limit_usd=Decimal(1000),
            ),
            BudgetPolicy(
                tenant_id=TENANT,
                scope_type=ScopeType.DEPLOYMENT,
                scope_id="dep-1",
                monthly_limit_usd=Decimal(5),
                warn_threshold_pct=50,
            ),
        ):
            await set_policy(connection, policy, actor="soak-check-test")


async def publish_alerts(pool: asyncpg.Pool, topics: PipelineTopics) -> int:
    """The outbox's alerts on the alerts topic, as the relay publishes them, and an aborted
    transaction holding a second copy of one (a read_committed reader never sees it)."""
    async with pool.acquire() as connection:
        pending = await pending_alerts(connection, limit=100)
    servers = topics.settings.kafka_bootstrap_servers
    producer = AIOKafkaProducer(bootstrap_servers=servers, enable_idempotence=True)
    await producer.start()
    try:
        for alert in pending:
            await producer.send_and_wait(
                topics.settings.alerts_topic, alert.payload, key=alert.tenant_id.encode()
            )
    finally:
        await producer.stop()
    aborting = AIOKafkaProducer(
        bootstrap_servers=servers, transactional_id=f"soak-check-{uuid.uuid4().hex}"
    )
    await aborting.start()
    try:
        await aborting.begin_transaction()
        await aborting.send_and_wait(topics.settings.alerts_topic, pending[0].payload)
        await aborting.abort_transaction()
    finally:
        await aborting.stop()
    return len(pending)


def failing(report: CheckReport) -> list[str]:
    return [row.name for row in report.rows if not row.ok]


async def test_a_faithful_run_passes_every_check_and_one_break_fails_only_its_own(
    soak_pool: asyncpg.Pool, kafka_bootstrap_servers: str, database_url: str
) -> None:
    pool = soak_pool
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=2
    )
    await ensure_topics(
        topics.settings, [topics.settings.alerts_topic], partitions=2, replication_factor=1
    )
    # The policies are set now, which the run's clock reads as early on 14 November.
    clock = SimulatedClock(
        start=datetime(2026, 11, 14, 1, tzinfo=UTC), real_start=time.time(), rate=1.0
    )
    await set_policies(pool)
    ledger = Ledger()

    october = [
        event("o1", "0.004", "2026-10-05T10:00:00Z"),
        event("o2", "0.003", "2026-10-06T10:00:00Z"),
        event("o3", "0.002", "2026-10-07T10:00:00Z", deployment=None, user_id="u1"),
    ]
    await land(pool, [encode(e) for e in october], 0)
    await close_month(pool, period="2026-10", now=NOW)
    november = [
        event("n1", "3", "2026-11-14T09:00:00Z", user_id="u1"),
        event("n2", "4", "2026-11-14T09:01:00Z"),
        event("n3", "4", "2026-11-14T09:02:00Z", deployment="dep-2", agent_id="a1"),
    ]
    late = event("o4", "0.01", "2026-10-31T23:00:00Z")  # after the close: an adjustment
    conflicting = encode(november[1] | {"customer_charge_usd": "4.5", "customer_charge_cents": 450})
    malformed = b'{"gateway_request_id": "bad-1", '
    outcome = await land(
        pool,
        [*(encode(e) for e in [*november, late]), encode(november[0]), conflicting, malformed],
        len(october),
    )
    for value in [*october, *november, late]:
        ledger.record_event(sent(value))
    ledger.aborted_ids.add("aborted-1")
    ledger.expect_dead_letter(conflicting, "conflicting_duplicate")
    ledger.expect_dead_letter(malformed, "invalid_json")
    ledger.sent.update(event=6, late=1, duplicate=1, conflicting=1, malformed=1)
    ledger.sent["transactional_aborted"] += 1

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap_servers)
    await producer.start()
    try:
        # Every dead letter once, and the first a second time: a crash before the commit.
        letters = outcome.dead_letters
        await publish_dead_letters(producer, topics.dlq, [*letters, letters[0]], failed_at=NOW)
    finally:
        await producer.stop()
    assert await publish_alerts(pool, topics) == 4

    async def check() -> CheckReport:
        return await check_soak(
            pool=pool,
            bootstrap_servers=kafka_bootstrap_servers,
            usage_topic=topics.usage,
            dlq_topic=topics.dlq,
            alerts_topic=topics.settings.alerts_topic,
            ledger=ledger,
            clock=clock,
            open_period="2026-11",
        )

    report = await check()
    assert report.ok, "\n".join(map(str, report.rows))
    found = {row.name.split(" ")[0]: row.found for row in report.rows}
    assert found["events"] == "7 rows: 0 missing, 0 extra, 0 changed"
    assert found["dead"] == "3 records: 0 not deserved, 1 extra copies, 0 missing"
    assert found["alerts:"].startswith("4 on the topic (exceeded 2, warning 2), 0 twice")
    assert found["closed"] == "1 closed (2026-10), 2 groups, 0 differ, 1 adjustment lines"
    assert len(report.rows) == 7

    # A user's counter (no policy watches it) off by 1e-18: only the counters check fails.
    nudge = """UPDATE budget_spend SET spend_usd = spend_usd + $1
               WHERE scope_type = 'user' AND scope_id = 'u1' AND "window" = 'daily'
                 AND period_start = '2026-11-14'"""
    await pool.execute(nudge, Decimal("1e-18"))
    assert failing(await check()) == ["budget counters equal the sums of raw events"]
    await pool.execute(nudge, Decimal("-1e-18"))

    # An id of an aborted transaction counted by the budget consumer.
    await pool.execute(
        "INSERT INTO budget_counted_events (gateway_request_id) VALUES ('aborted-1')"
    )
    assert failing(await check()) == ["nothing of an aborted transaction stored or counted"]
    await pool.execute("DELETE FROM budget_counted_events WHERE gateway_request_id = 'aborted-1'")

    # A record on the DLQ that nobody deserved.
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap_servers)
    await producer.start()
    try:
        headers = dead_letter_headers(
            reason=DeadLetterReason.INVALID_JSON,
            detail="not JSON",
            topic=topics.usage,
            partition=0,
            offset=99,
            failed_at=NOW,
        )
        await producer.send_and_wait(topics.dlq, b"not deserved", headers=headers)
    finally:
        await producer.stop()
    report = await check()
    assert failing(report) == ["dead letters deserved, none missing"]
    assert "deserved none" in report.rows[2].detail


async def test_a_topic_that_cannot_be_read_is_an_error_not_an_empty_topic(
    kafka_bootstrap_servers: str,
) -> None:
    missing = unique("soak-check-missing")
    started = time.monotonic()
    with pytest.raises(TopicUnreadableError, match=missing):
        await read_committed(kafka_bootstrap_servers, missing, within=3)
    assert time.monotonic() - started < 30
