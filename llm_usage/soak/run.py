"""`llm-usage soak`: start everything, load it, break it on schedule, drain, check, report."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from llm_usage.core.clock import CLOCK_VARIABLE
from llm_usage.core.settings import Settings, load_settings
from llm_usage.domain.periods import current_period
from llm_usage.domain.policies import BudgetPolicy
from llm_usage.kafka.topics import ensure_topics, pipeline_topics
from llm_usage.local.kafka import KafkaCluster, ensure_kafka_jars, free_port_block
from llm_usage.local.postgres import LocalPostgres
from llm_usage.soak.check import check_soak
from llm_usage.soak.faults import FaultInjector, lowered_limit
from llm_usage.soak.ledger import Ledger
from llm_usage.soak.load import LoadGenerator
from llm_usage.soak.plan import fault_plan, plan_lines
from llm_usage.soak.report import summary_lines, write_report
from llm_usage.soak.scenario import Scenario, build_scenario
from llm_usage.soak.timeline import AlertArrival, FaultMark, Sample
from llm_usage.soak.workers import WorkerExit, WorkerFleet
from llm_usage.storage.budget_policies import set_policy
from llm_usage.storage.migrate import migrate
from llm_usage.storage.pool import create_pool

PARTITIONS = 6
CLOSE_GRACE_HOURS = 0.5  # simulated: 30 real seconds at the default clock rate
WORKERS_READY_WITHIN = 180.0
DRAIN_WITHIN = 300.0
SAMPLE_EVERY = 1.0
SESSION_TIMEOUT_MS = 12_000
ACTOR = "soak"


@dataclass(frozen=True)
class SoakOptions:
    seed: int
    seconds: float
    rate: int
    report_dir: Path
    keep_data: bool = False


def worker_environment(settings: Settings, scenario: Scenario) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        CLOCK_VARIABLE: scenario.clock.encode(),
        "ROLLUP_CLOSE_GRACE_HOURS": str(CLOSE_GRACE_HOURS),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        # Shorter than a `sigstop` fault's pause, so that a paused replica is still thrown out
        # of its group and must find out when it resumes (plan.PAUSE_SECONDS); longer than a
        # killed replica's restart (plan.RESTART_AFTER_SECONDS and a start), which rejoins with
        # its instance id inside the session. A heartbeat a second keeps the session's start
        # close to the kill.
        "KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
        "KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    }


async def run_soak(options: SoakOptions) -> bool:
    """The whole run; True when every check passed. Services are stopped whatever happens."""
    options.report_dir.mkdir(parents=True, exist_ok=True)
    data = options.report_dir / "data"
    shutil.rmtree(data, ignore_errors=True)
    cluster = KafkaCluster(
        state_dir=data / "kafka",
        nodes=3,
        port=free_port_block(6),
        heap_mb=384,
        libs=ensure_kafka_jars(),
    )
    postgres = LocalPostgres(data_dir=data / "postgres", database="llm_usage_soak")
    print("starting a 3-broker Kafka cluster and PostgreSQL ...", flush=True)
    try:
        await asyncio.gather(asyncio.to_thread(cluster.start), asyncio.to_thread(postgres.start))
        settings = load_settings(
            kafka_bootstrap_servers=cluster.bootstrap_servers, database_url=postgres.dsn
        )
        return await _run(options, settings, cluster, postgres)
    finally:
        await asyncio.to_thread(cluster.stop)
        await asyncio.to_thread(postgres.stop)
        if not options.keep_data:
            shutil.rmtree(data, ignore_errors=True)


async def _run(
    options: SoakOptions, settings: Settings, cluster: KafkaCluster, postgres: LocalPostgres
) -> bool:
    pool = await create_pool(settings.database_url, size=2)
    async with pool.acquire() as connection:
        await migrate(connection)
    await ensure_topics(
        settings, pipeline_topics(settings), partitions=PARTITIONS, replication_factor=3
    )
    # The load starts at the clock's start; the workers, started first, already read the clock.
    real_start = time.time() + 30.0
    scenario = build_scenario(
        seed=options.seed,
        rate=options.rate,
        seconds=options.seconds,
        real_start=real_start,
        now=datetime.now(UTC),
    )
    month_end_at = scenario.clock.real_time_of(scenario.month_end) - real_start
    lowered_scope = f"{scenario.lowered.tenant_id}/deployment/{scenario.lowered.deployment_id}"
    plan = fault_plan(
        seed=options.seed,
        seconds=options.seconds,
        partitions=PARTITIONS,
        lowered_scope=lowered_scope,
        lower_at=round(month_end_at + 30.0, 1),
    )
    lines = plan_lines(seed=options.seed, seconds=options.seconds, faults=plan)
    print("\n".join(lines), flush=True)
    async with pool.acquire() as connection:
        for policy in scenario.policies:
            await set_policy(connection, policy, actor=ACTOR)

    fleet = WorkerFleet(
        directory=options.report_dir / "logs", environment=worker_environment(settings, scenario)
    )
    ledger = Ledger()
    generator = LoadGenerator(
        scenario,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        topic=settings.usage_topic,
        ledger=ledger,
    )
    samples: list[Sample] = []
    alerts: list[AlertArrival] = []
    stopping = asyncio.Event()
    await fleet.start()
    background: list[asyncio.Task[None]] = []
    try:
        await fleet.wait_until_ready(within=WORKERS_READY_WITHIN)
        await asyncio.sleep(max(0.0, real_start - time.time()))
        load_started = time.time()
        print(f"load: {options.rate} events/s for {options.seconds:.0f} s", flush=True)
        faults = FaultInjector(
            plan=plan,
            fleet=fleet,
            cluster=cluster,
            postgres=postgres,
            topic=settings.usage_topic,
            lower_policy=lambda: _lower_policy(pool, scenario),
            load_started=load_started,
        )
        fleet.on_exit = lambda ended: _note_exit(ended, load_started)
        background = [
            asyncio.create_task(_sample(settings, generator, samples, load_started, stopping)),
            asyncio.create_task(_read_alerts(settings, alerts, stopping)),
        ]
        await asyncio.gather(generator.run(asyncio.Event()), faults.run())
        print("load done; draining ...", flush=True)
        drained = await _drain(pool, ledger, samples)
        print("drained" if drained else f"not drained within {DRAIN_WITHIN:.0f} s", flush=True)
    finally:
        returncodes = await fleet.stop()
        stopping.set()
        for task in background:
            with contextlib.suppress(Exception):
                await task
    print(f"workers stopped: {returncodes}", flush=True)
    check = await check_soak(
        pool=pool,
        settings=settings,
        ledger=ledger,
        clock=scenario.clock,
        open_period=current_period(scenario.clock.now()),
    )
    await pool.close()
    marks = sorted(
        [*faults.marks, *_exit_marks(fleet.exits, load_started)], key=lambda mark: mark.t
    )
    report = write_report(
        options.report_dir,
        title=f"Soak, seed {options.seed}, {options.seconds:.0f} s at {options.rate} events/s",
        plan_lines=lines,
        samples=samples,
        faults=marks,
        alerts=alerts,
        ledger=ledger,
        check=check,
        run_start=load_started,
        duration_s=options.seconds,
    )
    for line in summary_lines(
        samples=samples,
        faults=marks,
        alerts=alerts,
        ledger=ledger,
        check=check,
        run_start=load_started,
    ):
        print(line)
    print(f"report: {report}")
    return check.ok


def _note_exit(ended: WorkerExit, load_started: float) -> None:
    if not ended.planned:
        print(
            f"  t={ended.at - load_started:7.1f} s  worker {ended.worker} exited on its own "
            f"with {ended.returncode}; restarting",
            flush=True,
        )


def _exit_marks(exits: list[WorkerExit], load_started: float) -> list[FaultMark]:
    return [
        FaultMark(
            t=round(ended.at - load_started, 1),
            kind="unplanned_exit",
            target=ended.worker,
            detail=f"exit code {ended.returncode}",
        )
        for ended in exits
        if not ended.planned
    ]


async def _lower_policy(pool: asyncpg.Pool, scenario: Scenario) -> str:
    lowered = scenario.lowered
    month = scenario.clock.now().date().replace(day=1)
    async with pool.acquire() as connection:
        spend = await connection.fetchval(
            """SELECT spend_usd FROM budget_spend WHERE tenant_id = $1 AND scope_type = 'deployment'
               AND scope_id = $2 AND "window" = 'monthly' AND period_start = $3""",
            lowered.tenant_id,
            lowered.deployment_id,
            month,
        )
        spend = spend if spend is not None else Decimal(0)
        limit = lowered_limit(spend)
        await set_policy(
            connection,
            BudgetPolicy(
                tenant_id=lowered.tenant_id,
                scope_type="deployment",  # type: ignore[arg-type]
                scope_id=lowered.deployment_id,
                monthly_limit_usd=limit,
            ),
            actor=ACTOR,
        )
    return (
        f"monthly limit {lowered.initial_monthly_limit_usd} -> {limit} "
        f"(spend {spend} in {month:%Y-%m})"
    )


async def _sample(
    settings: Settings,
    generator: LoadGenerator,
    samples: list[Sample],
    load_started: float,
    stopping: asyncio.Event,
) -> None:
    topic = settings.usage_topic
    while not stopping.is_set():
        t = round(time.time() - load_started, 1)
        end, usage, budget = await asyncio.gather(
            _bounded(_end_offsets(settings.kafka_bootstrap_servers, topic)),
            _bounded(_committed(settings.kafka_bootstrap_servers, settings.usage_group_id, topic)),
            _bounded(_committed(settings.kafka_bootstrap_servers, settings.budget_group_id, topic)),
        )
        samples.append(
            Sample(
                t,
                generator.published,
                _total(end),
                _total(usage),
                _total(budget),
                partition_ends=end,
                usage_partitions=usage,
                budget_partitions=budget,
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                stopping.wait(), max(0.0, SAMPLE_EVERY - (time.time() - load_started - t))
            )


def _total(offsets: tuple[int, ...] | None) -> int | None:
    return None if offsets is None else sum(offsets)


async def _bounded(query: Coroutine[Any, Any, tuple[int, ...]]) -> tuple[int, ...] | None:
    try:
        return await asyncio.wait_for(query, 3.0)
    except Exception:  # noqa: BLE001 - a broker down: this sample has a gap
        return None


async def _end_offsets(bootstrap_servers: str, topic: str) -> tuple[int, ...]:
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, request_timeout_ms=2500)
    await reader.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await reader.end_offsets(partitions)
        return tuple(int(ends[tp]) for tp in partitions)
    finally:
        await reader.stop()


async def _committed(bootstrap_servers: str, group_id: str, topic: str) -> tuple[int, ...]:
    """Per partition; a partition the group never committed counts 0."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=2500)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
    finally:
        await admin.close()
    committed = {
        tp.partition: int(meta.offset) for tp, meta in offsets.items() if tp.topic == topic
    }
    if not committed:  # a coordinator moving after a broker loss answers with nothing: unknown
        raise LookupError(f"no committed offsets of {group_id} in this answer")
    return tuple(max(committed.get(p, 0), 0) for p in range(PARTITIONS))


async def _read_alerts(
    settings: Settings, alerts: list[AlertArrival], stopping: asyncio.Event
) -> None:
    """Every alert as it arrives on the topic, with its arrival time (for the latency figures)."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await reader.start()
    try:
        reader.assign([TopicPartition(settings.alerts_topic, p) for p in range(PARTITIONS)])
        while not stopping.is_set():
            batches = await reader.getmany(timeout_ms=500)
            arrived = time.time()
            for records in batches.values():
                for record in records:
                    alert = json.loads(record.value or b"{}")
                    alerts.append(
                        AlertArrival(
                            alert_id=str(alert.get("alert_id")),
                            triggered_by=alert.get("triggered_by"),
                            arrived_at=arrived,
                        )
                    )
    finally:
        await reader.stop()


async def _drain(pool: asyncpg.Pool, ledger: Ledger, samples: list[Sample]) -> bool:
    """Until every acknowledged event is stored and counted and every alert published, with the
    counts steady for a few seconds; False if that did not happen within DRAIN_WITHIN."""
    deadline = time.monotonic() + DRAIN_WITHIN
    expected = len(ledger.events)
    steady_since: float | None = None
    last: tuple[int, int, int] | None = None
    while time.monotonic() < deadline:
        try:
            async with pool.acquire() as connection:
                counts = (
                    await connection.fetchval("SELECT count(*) FROM llm_usage_events"),
                    await connection.fetchval("SELECT count(*) FROM usage_event_ids WHERE counted"),
                    await connection.fetchval(
                        "SELECT count(*) FROM budget_alert_outbox WHERE published_at IS NULL"
                    ),
                )
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(1.0)
            continue
        done = counts[0] >= expected and counts[1] >= expected and counts[2] == 0
        if done and counts == last:
            steady_since = steady_since or time.monotonic()
            if time.monotonic() - steady_since >= 5.0:
                return True
        else:
            steady_since = None
        last = counts
        await asyncio.sleep(1.0)
    return False
