"""Events without a charge, priced from the price table by both real consumers alike; events no
price covers dead-lettered `unpriced`, and stored once a price exists and they are replayed."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import timedelta
from decimal import Decimal

import asyncpg
from prometheus_client import CollectorRegistry

from llm_usage.consumers.usage.price_drift import PRICE_DRIFT_METRIC, price_drift_counter
from llm_usage.consumers.usage.recorder import UsageRecorder
from tests import clock
from tests.integration.pipeline import (
    PipelineTopics,
    add_price,
    create_pipeline_topics,
    encode,
    header,
    produce,
    read_topic,
    stored_for,
    unique,
    unpriced_event,
    usage_event,
)
from tests.integration.test_budget_consumer import run_until_idle, set_policy, spend
from tests.integration.test_dlq_replay import drain, replay
from tests.records import consumer_record


async def run_both(topics: PipelineTopics) -> None:
    await drain(topics)
    await run_until_idle(topics)


async def test_both_consumers_price_an_event_without_a_charge_from_the_same_row(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=1
    )
    tenant, provider = unique("tenant"), unique("provider")
    occurred = clock.earlier_today().replace(microsecond=0)
    month = occurred.date().replace(day=1)
    # Two rows of the pair: the event's time picks the second, to the microsecond.
    await add_price(
        pool,
        provider,
        "m1",
        effective_from=occurred - timedelta(days=40),
        created_at=occurred - timedelta(days=41),
        input="5",
        output="20",
    )
    await add_price(
        pool,
        provider,
        "m1",
        effective_from=occurred,
        created_at=occurred - timedelta(days=1),
        input="2.5",
        output="10",
        cached_input="1.25",
        reasoning="12",
        fee="0.0001",
    )
    await set_policy(pool, tenant, "tenant", tenant, monthly="1000")
    estimated = unpriced_event(
        tenant,
        provider,
        "m1",
        occurred_at=clock.iso(occurred),
        input_tokens=1000,
        cached_input_tokens=400,
        output_tokens=300,
        reasoning_tokens=100,
    )
    before = unpriced_event(
        tenant, provider, "m1", occurred_at=(occurred - timedelta(microseconds=1)).isoformat()
    )
    charged = usage_event(tenant, provider=provider, model="m1", customer_charge_usd="0.0054")
    no_price = unpriced_event(tenant, provider, "m2")
    events = [estimated, before, charged, no_price]
    await produce(kafka_bootstrap_servers, topics.usage, [(b"k", encode(e)) for e in events])
    await run_both(topics)

    rows = {
        r["gateway_request_id"]: r
        for r in await stored_for(pool, [e["gateway_request_id"] for e in events])
    }
    # (600 x 2.5 + 400 x 1.25 + 200 x 10 + 100 x 12) / 10^6 + 0.0001
    expected = Decimal("0.0053")
    first = rows[estimated["gateway_request_id"]]
    assert (first["customer_charge_usd"], first["charge_estimated"]) == (expected, True)
    assert first["price_effective_from"] == occurred
    assert first["customer_charge_cents"] is None
    # A microsecond earlier, the first row: 1200 x 5 + 300 x 20, per million.
    second = rows[before["gateway_request_id"]]
    assert second["customer_charge_usd"] == Decimal("0.012")
    assert second["price_effective_from"] == occurred - timedelta(days=40)
    gateway = rows[charged["gateway_request_id"]]
    assert (gateway["charge_estimated"], gateway["price_effective_from"]) == (False, None)
    assert no_price["gateway_request_id"] not in rows

    # The budget consumer counted the same charges, and nothing for the unpriced event.
    total = expected + Decimal("0.012") + Decimal("0.0054")
    assert await spend(pool, tenant, "tenant", tenant, month) == total
    totals = await pool.fetchrow(
        "SELECT sum(charge_usd) AS charge, sum(estimated_charge_usd) AS estimated "
        "FROM usage_daily_totals WHERE tenant_id = $1",
        tenant,
    )
    assert totals is not None
    assert (totals["charge"], totals["estimated"]) == (total, expected + Decimal("0.012"))

    # The month's invoice line says how much of it was estimated.
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "llm_usage", "rollup", "run"),
        *("--period", month.strftime("%Y-%m"), "--tenant", tenant, "--json"),
        env={**os.environ, **topics.environment()},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0
    [line] = [json.loads(text) for text in out.decode().splitlines()]
    assert line["amount_cents"] == 2  # 0.0197 rounded once
    assert Decimal(line["meta"]["estimated_charge_usd"]) == expected + Decimal("0.012")

    [letter] = await read_topic(kafka_bootstrap_servers, topics.dlq, expected=1)
    assert header(letter, "dlq.reason") == "unpriced"
    assert provider in header(letter, "dlq.detail")
    assert "'m2'" in header(letter, "dlq.detail")


async def test_an_unpriced_event_is_stored_and_counted_once_replayed_after_a_price_exists(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=1
    )
    tenant, provider = unique("tenant"), unique("provider")
    occurred = clock.earlier_today().replace(microsecond=0)
    month = occurred.date().replace(day=1)
    await set_policy(pool, tenant, "tenant", tenant, monthly="1000")
    event = unpriced_event(tenant, provider, "m", occurred_at=clock.iso(occurred))
    await produce(kafka_bootstrap_servers, topics.usage, [(b"k", encode(event))])
    await run_both(topics)
    assert await stored_for(pool, [event["gateway_request_id"]]) == []
    assert await spend(pool, tenant, "tenant", tenant, month) == 0

    # The pair's first row, backdated and added now: a live event of the past would not take
    # it (it is younger than the lead), a replayed one does.
    now = await pool.fetchval("SELECT now()")
    await add_price(
        pool, provider, "m", effective_from=occurred, created_at=now, input="3", output="15"
    )
    code, out, err = await replay(topics, "--partition", "0", "--reason", "unpriced")
    assert code == 0, out + err
    assert "1 of 1 dead letters replayed" in out
    await run_both(topics)
    [row] = await stored_for(pool, [event["gateway_request_id"]])
    charge = Decimal("0.0081")  # 1200 x 3 + 300 x 15, per million
    assert (row["customer_charge_usd"], row["charge_estimated"]) == (charge, True)
    assert await spend(pool, tenant, "tenant", tenant, month) == charge


async def test_the_usage_consumer_counts_stored_events_whose_upstream_cost_drifts(
    pool: asyncpg.Pool,
) -> None:
    tenant, provider = unique("tenant"), unique("provider")
    occurred = clock.earlier_today()
    await add_price(
        pool,
        provider,
        "m",
        effective_from=occurred - timedelta(days=1),
        created_at=occurred - timedelta(days=2),
        input="2",
        output="8",
    )
    # List cost of 1200 in and 300 out: 0.0048. The gateway pays 0.0048, 0.00484 (within 1 %),
    # 0.0060 (stale: 25 % over) and, for a copy of the stale one, nothing new.
    sent = [
        usage_event(tenant, provider=provider, model="m", upstream_cost_usd=cost)
        for cost in ("0.0048", "0.00484", "0.0060", "0.0061")
    ]
    sent.append(sent[2])  # a duplicate is stored once, so checked once
    registry = CollectorRegistry()
    recorder = UsageRecorder(pool=pool, clock=clock.now, price_drift=price_drift_counter(registry))
    records = [
        consumer_record(encode(event), offset=offset, key=None) for offset, event in enumerate(sent)
    ]
    outcome = await recorder.record_batch(records)
    assert outcome.counts == {"recorded": 4, "duplicate": 1}
    drifted = registry.get_sample_value(PRICE_DRIFT_METRIC, {"provider": provider, "model": "m"})
    assert drifted == 2
