"""Budget-check holds ended by the budget consumer (design §4, §5, §10): the batch that counts an
event settles its hold in the same transaction, exactly once, whatever happens to the process;
the sweeper expires the holds whose events never come. Real Kafka, real PostgreSQL, the real
`llm-usage consume budget` process (and its handler in-process where a metric is asserted)."""

from __future__ import annotations

import signal
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from llm_usage.consumers.budget.handler import FAULT_BEFORE_HOLD_RELEASE, BudgetCounter
from llm_usage.consumers.budget.hold_outcomes import windows_missed
from llm_usage.consumers.budget.metrics import HoldMetrics
from llm_usage.core.faults import FAULT_EXIT_CODE, FAULT_VARIABLE
from llm_usage.domain.holds import CheckOutcome
from llm_usage.domain.periods import utc_day
from llm_usage.kafka.topics import ensure_topics
from llm_usage.storage.budget_holds import held_by_counter, place_check, sweep_holds
from llm_usage.testing.processes import free_port
from tests import clock
from tests.integration.pipeline import (
    PipelineTopics,
    create_pipeline_topics,
    encode,
    produce,
    spawn_consumer,
    unique,
    usage_event,
    wait_until,
)
from tests.integration.test_budget_consumer import budget_env, run_until_idle
from tests.integration.test_metric_names import sample_value
from tests.records import consumer_record

HOLD_SECONDS = 300


@pytest.fixture
async def topics(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> PipelineTopics:
    """Two partitions (these tests publish a few events) and the relay's alerts topic."""
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=2
    )
    await ensure_topics(
        topics.settings, [topics.settings.alerts_topic], partitions=1, replication_factor=1
    )
    return topics


async def crash_before_release(topics: PipelineTopics) -> None:
    """Run the budget consumer until it dies between counting a batch and releasing its holds."""
    crashing = await spawn_consumer(
        topics,
        "--exit-when-idle",
        "3",
        env=budget_env(topics, **{FAULT_VARIABLE: FAULT_BEFORE_HOLD_RELEASE}),
        worker="budget",
    )
    assert await crashing.finished(within=60) == FAULT_EXIT_CODE, crashing.log_tail()


async def check(
    pool: asyncpg.Pool,
    event: dict[str, Any],
    amount: str,
    *,
    now: datetime,
    hold_seconds: int = HOLD_SECONDS,
) -> CheckOutcome:
    """The gateway's check before the request whose usage `event` reports."""
    async with pool.acquire() as connection:
        return await place_check(
            connection,
            tenant_id=event["tenant_id"],
            gateway_request_id=event["gateway_request_id"],
            deployment_id=event.get("deployment_id"),
            user_id=event.get("user_id"),
            agent_id=event.get("agent_id"),
            amount_usd=Decimal(amount),
            now=now,
            hold_seconds=hold_seconds,
        )


async def publish(topics: PipelineTopics, *events: dict[str, Any]) -> None:
    await produce(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        [(event["tenant_id"].encode(), encode(event)) for event in events],
    )


async def hold_row(pool: asyncpg.Pool, event: dict[str, Any]) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT * FROM budget_holds WHERE tenant_id = $1 AND gateway_request_id = $2",
        event["tenant_id"],
        event["gateway_request_id"],
    )


async def held(pool: asyncpg.Pool, tenant: str) -> set[Decimal]:
    """What the tenant's counters hold, as a set ({0} when every hold ended exactly once)."""
    return set((await held_by_counter(pool, tenant)).values())  # type: ignore[arg-type]


async def tenant_spend(pool: asyncpg.Pool, tenant: str) -> dict[str, Decimal]:
    rows = await pool.fetch(
        'SELECT "window", spend_usd FROM budget_spend '
        "WHERE tenant_id = $1 AND scope_type = 'tenant'",
        tenant,
    )
    return {row["window"]: row["spend_usd"] for row in rows}


async def counted(pool: asyncpg.Pool, event: dict[str, Any]) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT counted FROM usage_event_ids WHERE gateway_request_id = $1",
            event["gateway_request_id"],
        )
    )


async def test_a_counted_event_settles_its_hold_once_and_a_duplicate_changes_nothing(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant, customer_charge_usd="0.0054")
    outcome = await check(pool, event, "0.01", now=clock.now())
    assert (outcome.decision, outcome.answer) == ("allow", "new")
    assert await held(pool, tenant) == {Decimal("0.01")}

    await publish(topics, event)
    await run_until_idle(topics)

    settled = await hold_row(pool, event)
    assert settled is not None
    assert (settled["state"], settled["ended_by"]) == ("settled", "consumer")
    assert settled["settled_charge_usd"] == Decimal("0.0054")
    assert await held(pool, tenant) == {Decimal(0)}
    assert await tenant_spend(pool, tenant) == {
        "daily": Decimal("0.0054"),
        "monthly": Decimal("0.0054"),
    }

    await publish(topics, event)
    await run_until_idle(topics)

    assert await hold_row(pool, event) == settled
    assert await held(pool, tenant) == {Decimal(0)}
    assert await tenant_spend(pool, tenant) == {
        "daily": Decimal("0.0054"),
        "monthly": Decimal("0.0054"),
    }


async def test_an_event_charging_more_than_its_hold_is_counted_as_overshoot(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    over, exact = (usage_event(tenant, customer_charge_usd="0.0054") for _ in range(2))
    await check(pool, over, "0.001", now=clock.now())
    await check(pool, exact, "0.0054", now=clock.now())
    await publish(topics, over, exact)

    consumer = await run_until_idle(topics)

    [line] = consumer.logged("Events charged more than their budget check held.")
    assert (line["holds"], line["over_usd"]) == (1, "0.0044")
    assert [example["gateway_request_id"] for example in line["examples"]] == [
        over["gateway_request_id"]
    ]
    assert await held(pool, tenant) == {Decimal(0)}
    assert (await tenant_spend(pool, tenant))["daily"] == Decimal("0.0108")


async def test_the_handler_counts_overshoot_and_a_period_mismatch_after_it_commits(
    pool: asyncpg.Pool,
) -> None:
    """In-process, to read the metrics: a hold on today settled by an event of yesterday."""
    tenant = unique("tenant")
    now = clock.now()
    yesterday = now - timedelta(days=1)
    late = usage_event(tenant, customer_charge_usd="0.02", occurred_at=clock.iso(yesterday))
    await check(pool, late, "0.01", now=now)
    metrics = HoldMetrics.create(registry := CollectorRegistry())
    counter = BudgetCounter(pool=pool, clock=lambda: now, holds=metrics)

    await counter.record_batch([consumer_record(encode(late), offset=0)])
    await counter.record_batch([consumer_record(encode(late), offset=1)])  # a duplicate

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("llm_usage_budget_holds_ended_total", how="settled") == 1
    assert value("llm_usage_budget_holds_ended_total", how="expired") == 0
    assert value("llm_usage_budget_hold_overshoot_total") == 1
    assert value("llm_usage_budget_hold_overshoot_usd_total") == pytest.approx(0.01)
    assert windows_missed(utc_day(now), utc_day(yesterday)) != ()
    assert value("llm_usage_budget_hold_period_mismatch_total") == 1
    assert await held(pool, tenant) == {Decimal(0)}


async def test_a_crash_between_count_and_release_rolls_both_back_and_a_restart_does_both_once(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant, customer_charge_usd="0.0054")
    await check(pool, event, "0.01", now=clock.now())
    await publish(topics, event)

    await crash_before_release(topics)

    still_open = await hold_row(pool, event)
    assert still_open is not None
    assert still_open["state"] == "open"
    assert not await counted(pool, event)
    assert await tenant_spend(pool, tenant) == {}
    assert await held(pool, tenant) == {Decimal("0.01")}

    await run_until_idle(topics)

    settled = await hold_row(pool, event)
    assert settled is not None
    assert (settled["state"], settled["ended_by"]) == ("settled", "consumer")
    assert await counted(pool, event)
    assert await held(pool, tenant) == {Decimal(0)}
    assert (await tenant_spend(pool, tenant))["daily"] == Decimal("0.0054")


async def test_a_restart_after_the_hold_expired_counts_the_event_once_and_ends_the_hold_once(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant, customer_charge_usd="0.0054")
    await check(pool, event, "0.01", now=clock.earlier_today(), hold_seconds=1)
    await publish(topics, event)
    await crash_before_release(topics)
    assert not await counted(pool, event)

    # The hold expires while the consumer is down (its own sweeper may have done it already).
    # The sweep's hold_seconds only decides when ended rows are forgotten: not yet.
    # The killed consumer's session may still hold the sweep lock for a moment (on Citus).
    async def swept() -> bool:
        return (await sweep_holds(pool, now=clock.now(), hold_seconds=HOLD_SECONDS)).ran

    await wait_until(swept, within=10, message="a sweep round ran")
    expired = await hold_row(pool, event)
    assert expired is not None
    assert (expired["state"], expired["ended_by"]) == ("expired", "sweeper")
    assert await held(pool, tenant) == {Decimal(0)}

    await run_until_idle(topics)

    assert await hold_row(pool, event) == expired
    assert await counted(pool, event)
    assert await held(pool, tenant) == {Decimal(0)}
    assert (await tenant_spend(pool, tenant))["daily"] == Decimal("0.0054")


async def test_the_sweeper_expires_a_hold_whose_event_never_comes_then_forgets_it(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    never_sent = usage_event(tenant)
    await check(pool, never_sent, "0.25", now=clock.now(), hold_seconds=1)
    port = free_port()
    # The sweeper forgets an ended row BUDGET_HOLD_SECONDS after its expiry: 3 s here, so that
    # the test sees the row expired before it is gone.
    consumer = await spawn_consumer(
        topics,
        env=budget_env(
            topics,
            BUDGET_HOLD_SECONDS="3",
            BUDGET_HOLD_SWEEP_SECONDS="0.2",
            METRICS_PORT=str(port),
        ),
        worker="budget",
    )

    async def ended() -> bool:
        row = await hold_row(pool, never_sent)
        return row is not None and row["state"] != "open"

    await wait_until(ended, within=60, message=f"the hold never ended\n{consumer.log_tail()}")
    row = await hold_row(pool, never_sent)
    assert row is not None
    assert (row["state"], row["ended_by"], row["settled_charge_usd"]) == (
        "expired",
        "sweeper",
        None,
    )
    assert await held(pool, tenant) == {Decimal(0)}

    async def forgotten() -> bool:
        return await hold_row(pool, never_sent) is None

    await wait_until(forgotten, within=60, message=f"never forgotten\n{consumer.log_tail()}")
    assert await held(pool, tenant) == {Decimal(0)}  # forgetting the row leaves the totals

    async def served() -> bool:
        return (
            await sample_value(port, "llm_usage_budget_holds_ended_total", how="expired") >= 1
            and await sample_value(port, "llm_usage_budget_hold_sweeps_total", result="swept") >= 2
        )

    await wait_until(served, within=30, message="the sweeper's metrics were never served")
    consumer.process.send_signal(signal.SIGTERM)
    assert await consumer.finished(within=40) == 0, consumer.log_tail()
    assert consumer.logged("Budget holds expired before their events were counted.")
