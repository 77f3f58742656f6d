"""The budget consumer against a real Kafka broker and a real PostgreSQL: spend counted once,
and each alert key on the alerts topic exactly once, whatever happens to the pipeline."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import Sequence
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from llm_usage.core.faults import FAULT_EXIT_CODE, FAULT_VARIABLE
from llm_usage.domain.budgets import AlertLevel, BudgetWindow, ScopeType, alert_id_for
from llm_usage.kafka.topics import ensure_topics
from llm_usage.storage.budget_holds import held_by_counter, place_check
from llm_usage.testing.topics import end_offsets, partitions_of
from tests import clock
from tests.integration.pipeline import (
    PipelineTopics,
    RestartablePostgres,
    RunningConsumer,
    create_pipeline_topics,
    encode,
    produce,
    spawn_consumer,
    unique,
    usage_event,
    wait_until,
)
from tests.unavailable import service_unavailable

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "schemas" / "budget_alert.v1.schema.json").read_text()
)


@pytest.fixture
async def topics(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> PipelineTopics:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=3
    )
    await ensure_topics(
        topics.settings, [topics.settings.alerts_topic], partitions=2, replication_factor=1
    )
    return topics


def budget_env(topics: PipelineTopics, **extra: str) -> dict[str, str]:
    return {**topics.environment(), "BUDGET_POLICY_SWEEP_SECONDS": "2", **extra}


async def run_until_idle(topics: PipelineTopics, **env: str) -> RunningConsumer:
    consumer = await spawn_consumer(
        topics, "--exit-when-idle", "3", env=budget_env(topics, **env), worker="budget"
    )
    assert await consumer.finished(within=120) == 0, consumer.log_tail()
    return consumer


async def set_policy(
    pool: asyncpg.Pool,
    tenant: str,
    scope_type: str,
    scope_id: str,
    *,
    monthly: str | None = None,
    daily: str | None = None,
    pct: int = 80,
) -> None:
    """What `llm-usage policy set` stores and announces, in one transaction."""
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(
            "INSERT INTO budget_policies (tenant_id, scope_type, scope_id, daily_limit_usd, "
            "monthly_limit_usd, warn_threshold_pct) VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (tenant_id, scope_type, scope_id) DO UPDATE SET "
            "daily_limit_usd = EXCLUDED.daily_limit_usd, "
            "monthly_limit_usd = EXCLUDED.monthly_limit_usd, "
            "warn_threshold_pct = EXCLUDED.warn_threshold_pct",
            tenant,
            scope_type,
            scope_id,
            Decimal(daily) if daily else None,
            Decimal(monthly) if monthly else None,
            pct,
        )
        await connection.execute("SELECT pg_notify('budget_policies', $1)", tenant)


async def alerts_on(topics: PipelineTopics, tenant: str) -> list[dict[str, Any]]:
    """Every alert of `tenant` on the topic, in offset order per partition; every alert on it
    validated by the schema. (The database is shared by the session: a consumer also alerts
    other tests' tenants whose spend is past their policies.)"""
    bootstrap = topics.settings.kafka_bootstrap_servers
    ends = await end_offsets(bootstrap, topics.settings.alerts_topic)
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await reader.start()
    try:
        partitions = [TopicPartition(topics.settings.alerts_topic, p) for p in ends]
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        found: list[dict[str, Any]] = []
        while [tp for tp in partitions if await reader.position(tp) < ends[tp.partition]]:
            for records in (await reader.getmany(timeout_ms=500)).values():
                for record in records:
                    alert = json.loads(record.value)
                    jsonschema.validate(alert, SCHEMA)
                    assert record.key == alert["tenant_id"].encode()
                    if alert["tenant_id"] == tenant:
                        found.append(alert)
        return found
    finally:
        await reader.stop()


def keys(alerts: Sequence[dict[str, Any]]) -> list[tuple[str, ...]]:
    return sorted(
        (a["scope_type"], a["scope_id"], a["window"], a["period_start"], a["level"], a["limit_usd"])
        for a in alerts
    )


async def spend(
    pool: asyncpg.Pool, tenant: str, scope_type: str, scope_id: str, month: date
) -> Decimal:
    value = await pool.fetchval(
        "SELECT spend_usd FROM budget_spend WHERE tenant_id = $1 AND scope_type = $2 "
        "AND scope_id = $3 AND \"window\" = 'monthly' AND period_start = $4",
        tenant,
        scope_type,
        scope_id,
        month,
    )
    return Decimal(value) if value is not None else Decimal(0)


async def test_each_level_alerts_once_with_the_event_that_crossed_it(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    at = clock.earlier_today()
    occurred, month = clock.iso(at), clock.month_of(at)
    await set_policy(pool, tenant, "deployment", "dep-1", monthly="1.00")
    events = [
        usage_event(tenant, customer_charge_usd="0.10", occurred_at=occurred) for _ in range(10)
    ]
    resent = [
        json.dumps(events[2], indent=2).encode(),  # a re-serialised duplicate
        # a conflicting duplicate: the same id with another charge
        encode({**events[3], "customer_charge_usd": "0.90", "customer_charge_cents": 90}),
        encode(usage_event(tenant, customer_charge_usd="-5", occurred_at=occurred)),  # invalid
    ]
    values = [encode(e) for e in events[:5]] + resent + [encode(e) for e in events]
    # One key, one partition: the order of the events, and so which one crosses, is fixed.
    await produce(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        [(tenant.encode(), v) for v in values],
    )

    consumer = await run_until_idle(topics)

    assert await spend(pool, tenant, "deployment", "dep-1", month) == Decimal("1.00")
    assert await spend(pool, tenant, "tenant", tenant, month) == Decimal("1.00")
    alerts = await alerts_on(topics, tenant)
    assert keys(alerts) == [
        ("deployment", "dep-1", "monthly", month.isoformat(), "exceeded", "1"),
        ("deployment", "dep-1", "monthly", month.isoformat(), "warning", "1"),
    ]
    by_level = {a["level"]: a for a in alerts}
    assert by_level["warning"]["triggered_by"] == events[7]["gateway_request_id"]
    assert Decimal(by_level["warning"]["spend_usd"]) == Decimal("0.80")
    assert by_level["warning"]["threshold_pct"] == 80
    assert by_level["exceeded"]["triggered_by"] == events[9]["gateway_request_id"]
    assert by_level["exceeded"]["threshold_pct"] == 100
    assert by_level["warning"]["alert_id"] == alert_id_for(
        tenant_id=tenant,
        scope_type=ScopeType.DEPLOYMENT,
        scope_id="dep-1",
        window=BudgetWindow.MONTHLY,
        period_start=month,
        level=AlertLevel.WARNING,
        limit_usd=Decimal("1.00"),
    )
    [stopped] = consumer.logged("Consumer stopped.")
    assert (stopped["recorded"], stopped["duplicate"], stopped["rejected"]) == (10, 7, 1)

    # A replay of the whole topic (the group's offsets reset to 0) counts and alerts nothing.
    await reset_group_offsets(topics)
    replayed = await run_until_idle(topics)
    [stopped] = replayed.logged("Consumer stopped.")
    assert stopped.get("recorded", 0) == 0
    assert await spend(pool, tenant, "deployment", "dep-1", month) == Decimal("1.00")
    assert keys(await alerts_on(topics, tenant)) == keys(alerts)


async def reset_group_offsets(topics: PipelineTopics) -> None:
    """Commit offset 0 on every partition for the budget group, as an operator's reset would."""
    bootstrap = topics.settings.kafka_bootstrap_servers
    partitions = [
        TopicPartition(topics.usage, p) for p in await partitions_of(bootstrap, topics.usage)
    ]
    member = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=topics.settings.budget_group_id,
        enable_auto_commit=False,
    )
    await member.start()
    try:
        member.assign(partitions)
        await member.commit({tp: 0 for tp in partitions})
    finally:
        await member.stop()


async def test_a_policy_set_below_the_spend_alerts_without_a_new_event(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    # The policy watcher checks the current month only: it must not end under the test.
    await clock.clear_of_midnight(timedelta(minutes=5))
    tenant = unique("tenant")
    at = clock.earlier_today()
    occurred, month = clock.iso(at), clock.month_of(at)
    events = [
        usage_event(tenant, customer_charge_usd="2.50", occurred_at=occurred) for _ in range(4)
    ]
    await produce(
        topics.settings.kafka_bootstrap_servers, topics.usage, [(None, encode(e)) for e in events]
    )
    consumer = await spawn_consumer(topics, env=budget_env(topics), worker="budget")
    try:

        async def counted() -> bool:
            return await spend(pool, tenant, "tenant", tenant, month) == Decimal("10.00")

        await wait_until(counted, within=60, message="the events were not counted")
        # Spend is 10.00; a limit of 8 is already exceeded: both levels, warning first, no event.
        await set_policy(pool, tenant, "tenant", tenant, monthly="8", daily=None)

        async def alerted() -> bool:
            return len(await alerts_on(topics, tenant)) == 2

        await wait_until(alerted, within=20, message="the policy change did not alert")
        alerts = await alerts_on(topics, tenant)
        assert [a["level"] for a in alerts] == ["warning", "exceeded"]
        assert all(a["triggered_by"] is None for a in alerts)
        assert all(Decimal(a["spend_usd"]) == Decimal("10.00") for a in alerts)

        # Raising the limit re-arms both levels for the new limit only; the old ones stay once.
        await set_policy(pool, tenant, "tenant", tenant, monthly="20")
        more = [
            usage_event(tenant, customer_charge_usd="3", occurred_at=occurred) for _ in range(2)
        ]
        await produce(
            topics.settings.kafka_bootstrap_servers,
            topics.usage,
            [(tenant.encode(), encode(e)) for e in more],
        )

        async def rearmed() -> bool:
            return len(await alerts_on(topics, tenant)) == 3

        await wait_until(rearmed, within=30, message="the raised limit did not re-arm")
        newest = (await alerts_on(topics, tenant))[-1]
        assert (newest["level"], newest["limit_usd"]) == ("warning", "20")
        assert newest["triggered_by"] == more[1]["gateway_request_id"]  # 16.00 = 80 % of 20

        # A deleted policy alerts no more, even past its old limit.
        await pool.execute("DELETE FROM budget_policies WHERE tenant_id = $1", tenant)
        past = [usage_event(tenant, customer_charge_usd="10", occurred_at=occurred)]
        await produce(
            topics.settings.kafka_bootstrap_servers, topics.usage, [(None, encode(e)) for e in past]
        )

        async def counted_past() -> bool:
            return await spend(pool, tenant, "tenant", tenant, month) == Decimal("26.00")

        await wait_until(counted_past, within=30, message="the last event was not counted")
    finally:
        consumer.process.send_signal(signal.SIGTERM)
        assert await consumer.finished(within=30) == 0, consumer.log_tail()
    assert len(await alerts_on(topics, tenant)) == 3


async def test_a_crash_between_publish_and_marking_never_publishes_twice(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    scopes = [f"dep-{n}" for n in range(5)]
    for scope in scopes:
        await set_policy(pool, tenant, "deployment", scope, monthly="1")
    events = [usage_event(tenant, deployment_id=scope, customer_charge_usd="1") for scope in scopes]
    await produce(
        topics.settings.kafka_bootstrap_servers, topics.usage, [(None, encode(e)) for e in events]
    )
    crashing = await spawn_consumer(
        topics,
        env=budget_env(topics, **{FAULT_VARIABLE: "crash_after_alert_publish"}),
        worker="budget",
    )
    assert await crashing.finished(within=60) == FAULT_EXIT_CODE, crashing.log_tail()
    published = await alerts_on(topics, tenant)
    assert published, "the crash came before anything was published"
    unmarked = await pool.fetchval(
        "SELECT count(*) FROM budget_alert_outbox WHERE tenant_id = $1 AND published_at IS NULL",
        tenant,
    )
    assert unmarked == len(published), "the crash should leave the published alerts unmarked"

    restarted = await run_until_idle(topics)
    alerts = await alerts_on(topics, tenant)
    assert len(alerts) == len({a["alert_id"] for a in alerts}) == 2 * len(scopes)
    assert restarted.logged(
        "Alerts a previous relay published but did not mark are marked now, not sent again."
    )
    unmarked = await pool.fetchval(
        "SELECT count(*) FROM budget_alert_outbox WHERE tenant_id = $1 AND published_at IS NULL",
        tenant,
    )
    assert unmarked == 0


# Around the midnight that began this month (last month is still a budget period evaluated).
_THIS, _LAST_DAY = clock.this_month(), clock.this_month() - timedelta(days=1)
_LAST = _LAST_DAY.replace(day=1)


@pytest.mark.parametrize(
    ("occurred_at", "day", "month"),
    [
        (f"{_LAST_DAY}T23:30:00-01:00", _THIS, _THIS),  # past midnight in UTC
        (f"{_THIS}T00:30:00+01:00", _LAST_DAY, _LAST),  # still last month in UTC
        (f"{_LAST_DAY}T23:59:59.999Z", _LAST_DAY, _LAST),
        (f"{_THIS}T00:00:00Z", _THIS, _THIS),
    ],
)
async def test_events_count_toward_their_own_utc_day_and_month(
    topics: PipelineTopics, pool: asyncpg.Pool, occurred_at: str, day: date, month: date
) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant, customer_charge_usd="0.25", occurred_at=occurred_at)
    await produce(topics.settings.kafka_bootstrap_servers, topics.usage, [(None, encode(event))])
    await run_until_idle(topics)
    rows = await pool.fetch(
        'SELECT "window", period_start AS start, spend_usd FROM budget_spend '
        "WHERE tenant_id = $1 AND scope_type = 'tenant'",
        tenant,
    )
    assert sorted((r["window"], r["start"], r["spend_usd"]) for r in rows) == [
        ("daily", day, Decimal("0.25")),
        ("monthly", month, Decimal("0.25")),
    ]


async def test_every_scope_of_an_event_adds_exact_sums_however_small_or_large(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    charges = ["0.000000000000000001", "999999999999.999999999999999999", "0.000000000000000001"]
    events = [
        usage_event(tenant, customer_charge_usd=charge, agent_id="agent-1", user_id=user)
        for charge, user in zip(charges, ["u1", "u1", None], strict=True)
    ]
    await produce(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        [(None, encode(event)) for event in events],
    )
    await run_until_idle(topics)
    rows = await pool.fetch(
        "SELECT scope_type, scope_id, spend_usd FROM budget_spend "
        "WHERE tenant_id = $1 AND \"window\" = 'monthly'",
        tenant,
    )
    exact = Decimal("1000000000000.000000000000000001")  # 999999999999.99...9 + 2e-18
    assert sorted((r["scope_type"], r["scope_id"], r["spend_usd"]) for r in rows) == [
        ("agent", "agent-1", exact),
        ("deployment", "dep-1", exact),
        ("tenant", tenant, exact),
        ("user", "u1", Decimal("1000000000000.000000000000000000")),
    ]


async def test_two_replicas_killed_at_random_count_exactly_and_alert_once(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=6
    )
    await ensure_topics(
        topics.settings, [topics.settings.alerts_topic], partitions=3, replication_factor=1
    )
    tenant = unique("tenant")
    at = clock.earlier_today()
    occurred, month = clock.iso(at), clock.month_of(at)
    deployments = [f"dep-{n}" for n in range(6)]
    for deployment in deployments:
        await set_policy(pool, tenant, "deployment", deployment, monthly="5")
    events = [
        usage_event(
            tenant,
            deployment_id=deployments[n % 6],
            customer_charge_usd=f"0.0{n % 9 + 1}",
            occurred_at=occurred,
        )
        for n in range(3000)
    ]
    # Every tenth request was checked first: its hold must end exactly once, with its batch.
    checked = events[::10]
    async with pool.acquire() as connection:
        for event in checked:
            await place_check(
                connection,
                tenant_id=tenant,
                gateway_request_id=event["gateway_request_id"],
                deployment_id=event["deployment_id"],
                user_id=event["user_id"],
                agent_id=None,
                amount_usd=Decimal(event["customer_charge_usd"]),
                now=at,
                hold_seconds=3600,
            )
    await produce(
        kafka_bootstrap_servers,
        topics.usage,
        [(e["deployment_id"].encode(), encode(e)) for e in events],
    )
    env = budget_env(topics, CONSUMER_MAX_BATCH="100")
    seed = random.randrange(1_000_000)
    print(f"kill schedule seed: {seed}")  # noqa: T201 - shown on failure, to replay it
    schedule = random.Random(seed)
    replicas = [await spawn_consumer(topics, env=env, worker="budget") for _ in range(2)]
    for _ in range(4):
        await asyncio.sleep(schedule.uniform(0.5, 3.0))
        victim = schedule.randrange(2)
        await replicas[victim].killed()
        replicas[victim] = await spawn_consumer(topics, env=env, worker="budget")
    for replica in replicas:

        async def started(replica: RunningConsumer = replica) -> bool:
            return bool(replica.logged("Consumer started."))

        # SIGTERM before the handler is installed would kill it as surely as SIGKILL.
        await wait_until(started, within=60, message="a replica did not start")
        replica.process.send_signal(signal.SIGTERM)
        assert await replica.finished(within=60) == 0, replica.log_tail()
    await run_until_idle(topics)

    for deployment in deployments:
        expected = sum(
            (Decimal(e["customer_charge_usd"]) for e in events if e["deployment_id"] == deployment),
            Decimal(0),
        )
        assert await spend(pool, tenant, "deployment", deployment, month) == expected
    assert await spend(pool, tenant, "tenant", tenant, month) == sum(
        (Decimal(e["customer_charge_usd"]) for e in events), Decimal(0)
    )
    alerts = await alerts_on(topics, tenant)
    assert keys(alerts) == sorted(
        ("deployment", d, "monthly", month.isoformat(), level, "5")
        for d in deployments
        for level in ("warning", "exceeded")
    )
    assert len({a["alert_id"] for a in alerts}) == len(alerts)
    ended = await pool.fetch(
        "SELECT state, ended_by, count(*) AS n FROM budget_holds WHERE tenant_id = $1 "
        "GROUP BY state, ended_by",
        tenant,
    )
    assert {(r["state"], r["ended_by"]): r["n"] for r in ended} == {
        ("settled", "consumer"): len(checked)
    }
    assert set((await held_by_counter(pool, tenant)).values()) == {Decimal(0)}  # type: ignore[arg-type]


async def test_a_database_restart_mid_stream_loses_and_doubles_nothing(
    topics: PipelineTopics, pool: asyncpg.Pool, postgres: RestartablePostgres
) -> None:
    if not postgres.can_restart:
        service_unavailable("the PostgreSQL in use (DATABASE_URL) is not ours to restart")
    tenant = unique("tenant")
    await set_policy(pool, tenant, "tenant", tenant, monthly="30")
    at = clock.earlier_today()
    occurred, month = clock.iso(at), clock.month_of(at)
    events = [
        usage_event(tenant, customer_charge_usd="0.01", occurred_at=occurred) for _ in range(4000)
    ]
    await produce(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        [(tenant.encode(), encode(e)) for e in events],
    )
    consumer = await spawn_consumer(
        topics,
        "--exit-when-idle",
        "3",
        env=budget_env(topics, CONSUMER_MAX_BATCH="50"),
        worker="budget",
    )

    async def some_counted() -> bool:
        return await spend(pool, tenant, "tenant", tenant, month) > Decimal("3")

    await wait_until(some_counted, within=60, message="the consumer counted nothing")
    await asyncio.to_thread(postgres.restart)
    assert await consumer.finished(within=150) == 0, consumer.log_tail()
    assert consumer.logged("Retrying after a transient failure."), consumer.log_tail()
    fresh = await asyncpg.connect(topics.settings.database_url)
    try:
        total = await fresh.fetchval(
            "SELECT spend_usd FROM budget_spend WHERE tenant_id = $1 AND scope_type = 'tenant' "
            "AND \"window\" = 'monthly'",
            tenant,
        )
    finally:
        await fresh.close()
    assert total == Decimal("40.00")
    alerts = await alerts_on(topics, tenant)
    assert [(a["level"], a["spend_usd"]) for a in alerts] == [
        ("warning", "24"),
        ("exceeded", "30"),
    ]
