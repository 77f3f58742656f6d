"""`llm-usage demo` (`make run`): local services, a short realistic stream through the real
consumer, a summary."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import uuid
from collections import Counter
from decimal import Decimal

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from tqdm import tqdm

from llm_usage.core.clock import worker_clock
from llm_usage.core.settings import Settings
from llm_usage.domain.money import usd_to_cents
from llm_usage.kafka.clients import client_options, new_producer, start_client
from llm_usage.local.run import prepare, settings_for_local_run
from llm_usage.local.sample_events import sample_stream
from llm_usage.storage.pool import create_pool

DEMO_EVENTS = 600
DEMO_DUP_RATE = 0.05


def run_demo() -> None:
    """Publish a short stream (duplicates, one malformed event) to local or configured services,
    run the usage consumer until idle, and print what landed per tenant."""
    settings = settings_for_local_run()
    asyncio.run(prepare(settings))
    run_id = uuid.uuid4().hex[:8]
    records = sample_stream(
        random.Random(run_id),
        count=DEMO_EVENTS,
        dup_rate=DEMO_DUP_RATE,
        id_prefix=f"demo-{run_id}",
        now=worker_clock()(),
    )
    # One malformed event: cut-off JSON, as a crashing producer might leave it.
    malformed = (b"acme", f'{{"gateway_request_id": "demo-{run_id}-broken", "tenant_'.encode())
    asyncio.run(_publish(settings, [(key, value) for key, value, _ in records], malformed))

    print("\nRunning the usage consumer (`llm-usage consume usage --exit-when-idle 3`)...")
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        "METRICS_PORT": "0",
        "LOG_FORMAT": "console",
        "LOG_LEVEL": "WARNING",
    }
    finished = subprocess.run(
        [sys.executable, "-m", "llm_usage", "consume", "usage", "--exit-when-idle", "3"],
        env=env,
        check=False,
    )
    if finished.returncode != 0:
        raise SystemExit(finished.returncode)

    published = Counter(event["tenant_id"] for _, _, event in records)
    asyncio.run(_summarise(settings, run_id, published))
    print(
        "\nTo keep a consumer running:\n"
        '  eval "$(.venv/bin/llm-usage dev env)"\n'
        "  .venv/bin/llm-usage consume usage      # Ctrl-C stops it cleanly\n"
        "Stop the local Kafka and PostgreSQL with: .venv/bin/llm-usage dev down"
    )


async def _publish(
    settings: Settings, records: list[tuple[bytes, bytes]], malformed: tuple[bytes, bytes]
) -> None:
    producer = new_producer(settings)
    await start_client(producer, settings)
    try:
        middle = len(records) // 2
        stream = [*records[:middle], malformed, *records[middle:]]
        deliveries = []
        for key, value in tqdm(stream, desc="Publishing demo events", unit="event"):
            deliveries.append(await producer.send(settings.usage_topic, key=key, value=value))
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()


async def _summarise(settings: Settings, run_id: str, published: Counter[str]) -> None:
    pool = await create_pool(settings.database_url, size=1)
    try:
        rows = await pool.fetch(
            """
            SELECT tenant_id, count(*) AS events, sum(customer_charge_usd) AS charge
            FROM llm_usage_events WHERE gateway_request_id LIKE $1
            GROUP BY tenant_id ORDER BY tenant_id
            """,
            f"demo-{run_id}-%",
        )
    finally:
        await pool.close()
    dead = await _dead_lettered_by_tenant(settings, run_id)
    stored: dict[str, asyncpg.Record] = {row["tenant_id"]: row for row in rows}

    print(f"\nWhat landed in llm_usage_events for demo run {run_id}:")
    header = f"{'tenant':<10}{'published':>10}{'stored':>8}{'dups dropped':>14}"
    print(f"{header}{'dead-lettered':>15}{'charge (exact USD)':>24}{'billed':>11}")
    for tenant in sorted(set(published) | set(stored) | set(dead)):
        row = stored.get(tenant)
        events = int(row["events"]) if row else 0
        charge = Decimal(row["charge"]) if row else Decimal(0)
        duplicates = published[tenant] - events
        billed = f"${Decimal(usd_to_cents(charge)).scaleb(-2):,.2f}"  # rounded once, half up
        print(
            f"{tenant:<10}{published[tenant]:>10}{events:>8}{duplicates:>14}"
            f"{dead.get(tenant, 0):>15}{charge:>24}{billed:>11}"
        )


async def _dead_lettered_by_tenant(settings: Settings, run_id: str) -> Counter[str]:
    """Count this run's records on the DLQ, by key (the tenant)."""
    # Without a group, a subscription gets every partition, read from the earliest offset.
    consumer = AIOKafkaConsumer(
        settings.dlq_topic,
        **client_options(settings),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await start_client(consumer, settings)
    counts: Counter[str] = Counter()
    marker = f"demo-{run_id}-".encode()
    ends: dict[TopicPartition, int] | None = None
    try:
        while True:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                for record in batch:
                    if record.value and marker in record.value:
                        reason = dict(record.headers).get("dlq.reason", b"?").decode()
                        counts[(record.key or b"").decode()] += 1
                        print(f"  dead letter: key={record.key!r} reason={reason}")
            assigned = list(consumer.assignment())
            if assigned and ends is None:
                ends = await consumer.end_offsets(assigned)
            if ends is not None and all(
                [await consumer.position(tp) >= end for tp, end in ends.items()]
            ):
                break
    finally:
        await consumer.stop()
    return counts
