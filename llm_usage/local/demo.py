"""`llm-usage demo` (`make run`): local services, budget policies, a short realistic stream
through the usage and budget consumers, the alerts they raise, the month's invoice lines, and the
tenant's page."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from tqdm import tqdm

from llm_usage.core.clock import worker_clock
from llm_usage.core.settings import Settings
from llm_usage.domain.money import usd_to_cents
from llm_usage.kafka.clients import client_options, new_producer, start_client
from llm_usage.local.demo_budgets import AlertWatch, demo_policies, set_demo_policies
from llm_usage.local.run import prepare, settings_for_local_run
from llm_usage.local.sample_events import DEMO_TENANTS, SampleTenant, sample_stream
from llm_usage.storage.pool import create_pool

DEMO_EVENTS = 600
DEMO_DUP_RATE = 0.05
IDLE_SECONDS = "3"
_SPREAD_SECONDS = 3600


@dataclass(frozen=True)
class DemoRun:
    """One demo run: its settings, tenants (the first holds the monthly policy), clock reading,
    distinct events and the alerts printed."""

    settings: Settings
    tenants: list[str]
    now: datetime
    events: list[dict[str, Any]]
    alerts: list[dict[str, Any]]

    def exact_by_line(self) -> dict[tuple[str, str | None], Decimal]:
        """The exact sum of the stream's charges per invoice line: (tenant, deployment)."""
        exact: dict[tuple[str, str | None], Decimal] = defaultdict(Decimal)
        for event in self.events:
            exact[event["tenant_id"], event["deployment_id"]] += Decimal(
                event["customer_charge_usd"]
            )
        return exact


def print_next_steps() -> None:
    print(
        "\nTo keep the consumers running:\n"
        '  eval "$(.venv/bin/llm-usage dev env)"\n'
        "  .venv/bin/llm-usage consume usage      # Ctrl-C stops it cleanly\n"
        "  .venv/bin/llm-usage consume budget\n"
        "Stop the local Kafka and PostgreSQL with: .venv/bin/llm-usage dev down"
    )


def heading(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def dollars(cents: int) -> str:
    """`$1,234.57` for 123457 cents."""
    return f"${Decimal(cents).scaleb(-2):,.2f}"


def run_demo() -> DemoRun:
    """Set two budget policies, publish a short stream (duplicates, one malformed event) to
    local or configured services, run the usage and budget consumers until idle while printing
    the alerts, and print what landed per tenant; return what the run was, for what follows."""
    settings = settings_for_local_run()
    asyncio.run(prepare(settings))
    run_id = uuid.uuid4().hex[:8]
    # This run's own tenants: its budgets and invoice lines are its stream's alone, however
    # many demos ran before in the same month.
    tenants = tuple(
        SampleTenant(f"{tenant.tenant_id}-{run_id}", tenant.deployments) for tenant in DEMO_TENANTS
    )
    now = worker_clock()()
    since_midnight = int(
        (now - now.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds()
    )
    records = sample_stream(
        random.Random(run_id),
        count=DEMO_EVENTS,
        dup_rate=DEMO_DUP_RATE,
        id_prefix=f"demo-{run_id}",
        now=now,
        tenants=tenants,
        # Within today (UTC), so that the daily and monthly budgets and the month's lines all
        # see the whole stream.
        spread_seconds=min(_SPREAD_SECONDS, since_midnight),
    )
    events = list({event["gateway_request_id"]: event for _, _, event in records}.values())
    names = [tenant.tenant_id for tenant in tenants]

    heading("Budget policies (as `llm-usage policy set` sets them)")
    policies = demo_policies(events, monthly_tenant=names[0], daily_tenant=names[1])
    asyncio.run(set_demo_policies(settings, policies))

    heading(f"Publishing demo run {run_id}: {DEMO_EVENTS} events to {settings.usage_topic}")
    # One malformed event: cut-off JSON, as a crashing producer might leave it.
    malformed = (
        names[0].encode(),
        f'{{"gateway_request_id": "demo-{run_id}-broken", "tenant_'.encode(),
    )
    alerts = asyncio.run(
        _publish_and_consume(
            settings,
            [(key, value) for key, value, _ in records],
            malformed,
            tenants=set(names),
            expected_alerts=2 * len(policies),
        )
    )

    heading(f"What landed in llm_usage_events (demo run {run_id})")
    published = Counter(event["tenant_id"] for _, _, event in records)
    asyncio.run(_summarise(settings, run_id, published))

    return DemoRun(settings=settings, tenants=names, now=now, events=events, alerts=alerts)


async def _publish_and_consume(
    settings: Settings,
    records: list[tuple[bytes, bytes]],
    malformed: tuple[bytes, bytes],
    *,
    tenants: set[str],
    expected_alerts: int,
) -> list[dict[str, Any]]:
    """Publish, then run both consumers until idle, printing the alerts as they arrive."""
    watch = AlertWatch(settings, tenants)
    await watch.start()
    await _publish(settings, records, malformed)
    heading(
        f"Running the usage and budget consumers (`llm-usage consume usage|budget "
        f"--exit-when-idle {IDLE_SECONDS}`); alerts as they reach {settings.alerts_topic}:"
    )
    consumers_done = asyncio.Event()
    watching = asyncio.create_task(
        watch.run(expected=expected_alerts, consumers_done=consumers_done)
    )
    try:
        codes = await asyncio.gather(
            *(consume_until_idle(settings, name) for name in ("usage", "budget"))
        )
    finally:
        consumers_done.set()
        await watching
    for code in codes:
        if code != 0:
            raise SystemExit(code)
    if len(watch.alerts) < expected_alerts:
        print(f"  ({expected_alerts - len(watch.alerts)} alerts had not reached the topic yet)")
    return watch.alerts


async def consume_until_idle(settings: Settings, consumer: str) -> int:
    """Run `llm-usage consume <consumer> --exit-when-idle` as a child process; its exit code."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        "METRICS_PORT": "0",
        "LOG_FORMAT": "console",
        "LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_usage",
        "consume",
        consumer,
        "--exit-when-idle",
        IDLE_SECONDS,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
    )
    return await process.wait()


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

    header = f"  {'tenant':<18}{'published':>10}{'stored':>8}{'dups dropped':>14}"
    print(f"{header}{'dead-lettered':>15}{'charge (exact USD)':>24}{'billed':>11}")
    for tenant in sorted(set(published) | set(stored) | set(dead)):
        row = stored.get(tenant)
        events = int(row["events"]) if row else 0
        charge = Decimal(row["charge"]) if row else Decimal(0)
        duplicates = published[tenant] - events
        billed = dollars(usd_to_cents(charge))  # rounded once, half up
        print(
            f"  {tenant:<18}{published[tenant]:>10}{events:>8}{duplicates:>14}"
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
