"""`llm-usage bench budget`: alert latency at a fixed event rate, and the budget consumer's
throughput beside the usage consumer's, measured in the same run.

1. Latency. The budget consumer runs as its own process (`python -m llm_usage consume budget`,
   as ops run it). This process publishes events at a fixed rate over many tenants whose
   policies keep crossing, stamps each event when it hands it to the producer, and reads the
   alerts topic, stamping each alert when it arrives. An alert's latency is its arrival minus
   the publish stamp of the event named in `triggered_by`.
2. Throughput. A backlog is published first (not timed); the usage consumer and then the budget
   consumer each drain it in this process, timed from first fetch to last commit, as
   `bench ingest` times the usage consumer.
3. Memory. The budget consumer as its own process (`consume budget`, with its batch size
   BUDGET_MAX_BATCH, decode-ahead on, as ops run it) drains the same backlog again with a group
   of its own into emptied counters; its resident memory is sampled as it goes and its peak is
   the kernel's high-water mark (VmHWM), as `bench ingest` reports the usage consumer's.
4. Corrections (`--corrections N`, design §13.2): the same backlog with N corrections mixed in
   (`bench.support.with_corrections`, the mix `bench ingest` uses) is published on a topic of its
   own; `--corrections-runs` rounds each drain the backlog without and then with them (the usage
   consumer first, untimed; then the budget consumer, timed), with fresh groups into emptied
   tables. Reported: the budget consumer's events/s (events only) and records/s (corrections
   included) of each, and with/without (goal >= 0.9). Every correction must be applied
   (`budget_corrections`) or parked by the end.

The workload is generated up front, so which event crosses which level of which policy is known
before anything is published: every alert that arrives is checked against that prediction,
and every predicted alert must arrive exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import random
import signal
import time
import uuid
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from llm_usage.bench.ingest import Spread, rss_at
from llm_usage.bench.support import (
    Measurement,
    StreamRecord,
    TimedRun,
    bench_database,
    freeze_harness_objects,
    process_cpu_seconds,
    process_memory,
    publish_backlog,
    time_consumer,
    verify_judged,
    with_corrections,
)
from llm_usage.consumers.budget.consumer import budget_consumer_spec
from llm_usage.consumers.budget.crossing import Contribution, crossings_by_events
from llm_usage.consumers.budget.metrics import BudgetMetrics
from llm_usage.consumers.usage.consumer import usage_consumer_spec
from llm_usage.core.logs import configure_logging
from llm_usage.core.settings import Settings
from llm_usage.domain.budgets import BudgetWindow, CounterKey, ScopeType, period_start
from llm_usage.domain.policies import BudgetPolicy
from llm_usage.kafka.clients import new_producer, new_reader, start_client
from llm_usage.kafka.topics import ensure_topics
from llm_usage.local.run import settings_for_local_run
from llm_usage.local.sample_events import SampleTenant, sample_stream
from llm_usage.storage.budget_policies import set_policy
from llm_usage.storage.migrate import migrate
from llm_usage.testing.processes import WorkerProcess

BENCH_DATABASE = "llm_usage_bench_budget"
WARN_PCT = 80
# Each scope's monthly limit is a share, drawn in this range, of what the workload spends on
# it: every scope crosses `warning` and then `exceeded` while the events flow, at times spread
# over the whole run rather than bunched at one moment.
LIMIT_SHARE = (0.05, 0.95)
TARGET_P99_SECONDS = 1.0
PARTITIONS = 6
TARGET_CORRECTED_OVER_PLAIN = 0.9  # issue 24: 5 % corrections within 10 % of the backlog without
_LIMIT_QUANTUM = Decimal("1e-10")  # the sample charges' own precision
_TICK_SECONDS = 0.002  # the publisher wakes this often and sends what is due
_READY_WITHIN_SECONDS = 90.0
_ALERTS_STALL_SECONDS = 30.0  # after the last event, give up once no alert came for this long
_DUPLICATE_WATCH_SECONDS = 2.0  # reading on after the last expected alert, for second copies
_STOP_WITHIN_SECONDS = 40.0
_RSS_SAMPLE_SECONDS = 0.2
_RSS_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # where in the drain the RSS profile is shown
_DRAIN_STALL_SECONDS = 60.0  # the memory run gives up once nothing was counted for this long
_MIB = 1024 * 1024
_POLICY_WRITERS = 4
_BENCH_TABLES = (
    "llm_usage_events",
    "budget_policies",
    "budget_policy_audit",
    "usage_event_ids",
    "budget_spend",
    "budget_alert_outbox",
    "budget_alert_relay_positions",
)
# What a drain of a backlog writes, emptied before each one.
_DRAIN_TABLES = (
    "llm_usage_events",
    "usage_event_ids",
    "usage_daily_totals",
    "usage_daily_dimensions",
    "budget_spend",
    "budget_alert_outbox",
    "budget_alert_relay_positions",
    "usage_corrections",
    "usage_event_effective",
    "correction_waits",
    "budget_corrections",
)


# ---------------------------------------------------------------------------------------------
# Pure pieces: pacing, percentiles, limits, the predicted alerts, metric totals.


def due_count(elapsed_seconds: float, rate: float, total: int) -> int:
    """How many of `total` events a publisher at `rate` a second has to have sent by now."""
    if elapsed_seconds <= 0:
        return 0
    return min(total, math.floor(elapsed_seconds * rate))


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile of values sorted ascending (p100 is the maximum)."""
    if not sorted_values:
        raise ValueError("no values")
    if not 0 < pct <= 100:
        raise ValueError(f"a percentile is above 0 and at most 100, not {pct}")
    rank = math.ceil(pct / 100 * len(sorted_values))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class LatencySummary:
    count: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> LatencySummary:
        ordered = sorted(values)
        return cls(
            count=len(ordered),
            p50=percentile(ordered, 50),
            p95=percentile(ordered, 95),
            p99=percentile(ordered, 99),
            max=ordered[-1],
        )


def limit_for(spend_usd: Decimal, share: float) -> Decimal | None:
    """A limit that `spend_usd` passes: `share` of it, rounded down (None when that is 0)."""
    limit = (spend_usd * Decimal(repr(share))).quantize(_LIMIT_QUANTUM, rounding=ROUND_DOWN)
    return limit if limit > 0 else None


@dataclass
class Workload:
    """Events in publish order and the policies they cross, with every alert predicted."""

    tenant_prefix: str
    records: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: list[StreamRecord] = field(default_factory=list)  # the records with their events
    # For each record, the index of the record that first carried its id (itself, unless it
    # is a re-send): the first is the one that counts, so its publish time is the one to stamp.
    first_index: list[int] = field(default_factory=list)
    index_of: dict[str, int] = field(default_factory=dict)
    policies: list[BudgetPolicy] = field(default_factory=list)
    # alert_id -> gateway_request_id of the event predicted to cross it
    expected: dict[str, str] = field(default_factory=dict)

    @property
    def unique(self) -> int:
        return len(self.index_of)


def bench_tenants(prefix: str, *, tenants: int, deployments: int) -> tuple[SampleTenant, ...]:
    """Tenants `{prefix}00000`…, each with `deployments` deployments and events without one."""
    names = tuple(f"dep-{d}" for d in range(1, deployments + 1))
    return tuple(SampleTenant(f"{prefix}{n:05d}", (*names, None)) for n in range(tenants))


def predicted_alerts(
    contributions: dict[CounterKey, list[Contribution]], policies: Iterable[BudgetPolicy]
) -> dict[str, str]:
    """Every alert the policies' monthly limits raise over these counters (each counter's
    contributions in the order its events are consumed), by alert id: the triggering event."""
    by_scope: dict[tuple[str, str, str], list[CounterKey]] = {}
    for key in contributions:
        by_scope.setdefault(key.scope, []).append(key)
    expected: dict[str, str] = {}
    for policy in policies:
        limit = policy.monthly_limit_usd
        if limit is None:
            continue
        for key in by_scope.get(policy.key, []):
            if key.window is not BudgetWindow.MONTHLY:
                continue
            for crossing in crossings_by_events(
                Decimal(0),
                contributions[key],
                limit_usd=limit,
                warn_threshold_pct=policy.warn_threshold_pct,
            ):
                alert_id = key.alert_id(crossing.level, limit)
                assert crossing.triggered_by is not None
                expected[alert_id] = crossing.triggered_by
    return expected


def build_workload(
    rng: random.Random,
    *,
    id_prefix: str,
    tenant_prefix: str,
    events: int,
    tenants: int,
    deployments: int,
    dup_rate: float,
    now: datetime,
) -> Workload:
    """`events` realistic events (about `dup_rate` of them re-sends) keyed on their tenant, a
    monthly policy on every tenant and deployment, and the alerts they must raise.

    Events keyed on the tenant share a partition, so each tenant's and deployment's events are
    consumed in publish order: which event crosses a level is known in advance.
    """
    stream = sample_stream(
        rng,
        count=events,
        dup_rate=dup_rate,
        id_prefix=id_prefix,
        now=now,
        tenants=bench_tenants(tenant_prefix, tenants=tenants, deployments=deployments),
    )
    workload = Workload(tenant_prefix, stream=stream)
    contributions: dict[CounterKey, list[Contribution]] = {}
    this_month = period_start(BudgetWindow.MONTHLY, now)
    spend: dict[tuple[str, ScopeType, str], Decimal] = {}
    for index, (key, value, event) in enumerate(stream):
        request_id = str(event["gateway_request_id"])
        first = workload.index_of.setdefault(request_id, index)
        workload.records.append((key, value))
        workload.first_index.append(first)
        if first != index:
            continue
        amount = Decimal(str(event["customer_charge_usd"]))
        month = period_start(BudgetWindow.MONTHLY, datetime.fromisoformat(event["occurred_at"]))
        tenant_id = str(event["tenant_id"])
        scopes = [(ScopeType.TENANT, tenant_id)]
        if event["deployment_id"] is not None:
            scopes.append((ScopeType.DEPLOYMENT, str(event["deployment_id"])))
        for scope_type, scope_id in scopes:
            counter = CounterKey(tenant_id, scope_type, scope_id, BudgetWindow.MONTHLY, month)
            contributions.setdefault(counter, []).append(Contribution(request_id, amount))
            if month == this_month:
                scope = (tenant_id, scope_type, scope_id)
                spend[scope] = spend.get(scope, Decimal(0)) + amount
    for (tenant_id, scope_type, scope_id), total in sorted(spend.items()):
        limit = limit_for(total, rng.uniform(*LIMIT_SHARE))
        if limit is not None:
            workload.policies.append(
                BudgetPolicy(
                    tenant_id=tenant_id,
                    scope_type=scope_type,
                    scope_id=scope_id,
                    monthly_limit_usd=limit,
                    warn_threshold_pct=WARN_PCT,
                )
            )
    workload.expected = predicted_alerts(contributions, workload.policies)
    return workload


def metric_totals(exposition: str, *, consumer: str) -> dict[str, float]:
    """Prometheus text → each sample name's total over its labels, keeping only the samples of
    `consumer` where a sample is labelled by consumer."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.labels.get("consumer", consumer) != consumer:
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


@dataclass(frozen=True)
class CorrectionsRound:
    """One round of the corrections comparison: the budget consumer's busy seconds on the
    backlog without its corrections and with them."""

    events: int  # the backlog's records without the corrections (re-sends included)
    corrections: int
    plain_seconds: float
    corrected_seconds: float

    @property
    def plain_rate(self) -> float:
        return self.events / self.plain_seconds

    @property
    def corrected_rate(self) -> float:
        """Events/s with the corrections mixed in, counting the events only."""
        return self.events / self.corrected_seconds

    @property
    def corrected_records_rate(self) -> float:
        """Records/s with the corrections mixed in, counting them too."""
        return (self.events + self.corrections) / self.corrected_seconds

    @property
    def ratio(self) -> float:
        return self.corrected_rate / self.plain_rate


def corrections_round_line(number: int, run: CorrectionsRound) -> str:
    return (
        f"  round {number}: without {run.plain_rate:,.0f} events/s ({run.plain_seconds:.2f} s); "
        f"with {run.corrections:,} corrections {run.corrected_rate:,.0f} events/s, "
        f"{run.corrected_records_rate:,.0f} records/s ({run.corrected_seconds:.2f} s); "
        f"with/without {run.ratio:.3f}"
    )


def corrections_lines(rounds: Sequence[CorrectionsRound]) -> list[str]:
    """The budget consumer with and without the corrections: medians and spreads over the
    rounds, and the goal."""
    ratio = Spread.of(run.ratio for run in rounds)
    verdict = "met" if ratio.median >= TARGET_CORRECTED_OVER_PLAIN else "MISSED"
    return [
        f"\nBudget consumer with {rounds[0].corrections:,} corrections mixed into the backlog "
        f"and without, {len(rounds)} round{'s' if len(rounds) != 1 else ''} (median (range))",
        f"  without      {Spread.of(run.plain_rate for run in rounds).describe(',.0f')} events/s",
        f"  with         {Spread.of(run.corrected_rate for run in rounds).describe(',.0f')} "
        f"events/s (events only), "
        f"{Spread.of(run.corrected_records_rate for run in rounds).describe(',.0f')} records/s",
        f"  with/without {ratio.describe('.3f')}   target >= {TARGET_CORRECTED_OVER_PLAIN:g}: "
        f"{verdict}",
    ]


# ---------------------------------------------------------------------------------------------
# The latency run.


@dataclass(frozen=True)
class ArrivedAlert:
    alert_id: str
    tenant_id: str
    triggered_by: str | None
    arrived_at: float  # perf_counter() when this process had it in hand


@dataclass(frozen=True)
class Publishing:
    events: int
    seconds: float
    most_behind_seconds: float  # how far the publisher fell behind its schedule at worst
    ended_at: float  # perf_counter() when the last event was handed to the producer


@dataclass(frozen=True)
class AlertCheck:
    expected: int
    arrived: int
    missing: int
    unexpected: int
    twice: int
    other_trigger: int
    no_trigger: int

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.twice or self.other_trigger)


def check_alerts(expected: dict[str, str], arrived: Sequence[ArrivedAlert]) -> AlertCheck:
    """Each predicted alert arrived exactly once, triggered by the predicted event."""
    copies = Counter(alert.alert_id for alert in arrived)
    first = {alert.alert_id: alert for alert in reversed(arrived)}
    return AlertCheck(
        expected=len(expected),
        arrived=len(copies),
        missing=sum(1 for alert_id in expected if alert_id not in copies),
        unexpected=sum(1 for alert_id in copies if alert_id not in expected),
        twice=sum(1 for count in copies.values() if count > 1),
        other_trigger=sum(
            1
            for alert_id, alert in first.items()
            if alert_id in expected and alert.triggered_by != expected[alert_id]
        ),
        no_trigger=sum(1 for alert in first.values() if alert.triggered_by is None),
    )


def alert_latencies(
    arrived: Iterable[ArrivedAlert], index_of: dict[str, int], stamps: Sequence[float]
) -> list[float]:
    """Arrival minus the publish stamp of the triggering event, for each alert's first copy
    that names an event of this run."""
    latencies: list[float] = []
    seen: set[str] = set()
    for alert in arrived:
        if alert.alert_id in seen or alert.triggered_by is None:
            continue
        seen.add(alert.alert_id)
        index = index_of.get(alert.triggered_by)
        if index is not None and stamps[index] > 0:
            latencies.append(alert.arrived_at - stamps[index])
    return latencies


def latency_split(
    arrived: Iterable[ArrivedAlert],
    index_of: dict[str, int],
    stamps: Sequence[float],
    decided_at: dict[str, float],
    *,
    perf_to_wall: float,
) -> tuple[list[float], list[float]]:
    """Each alert's latency in two parts, at the outbox row's `created_at` (wall clock: the start
    of the batch transaction that decided it): publish -> decided, decided -> arrived."""
    to_decided: list[float] = []
    to_arrival: list[float] = []
    seen: set[str] = set()
    for alert in arrived:
        if alert.alert_id in seen or alert.triggered_by is None:
            continue
        seen.add(alert.alert_id)
        index = index_of.get(alert.triggered_by)
        decided = decided_at.get(alert.alert_id)
        if index is None or stamps[index] <= 0 or decided is None:
            continue
        to_decided.append(decided - (stamps[index] + perf_to_wall))
        to_arrival.append(alert.arrived_at + perf_to_wall - decided)
    return to_decided, to_arrival


async def publish_paced(
    producer: AIOKafkaProducer,
    topic: str,
    workload: Workload,
    *,
    rate: float,
    stamps: array[float],
) -> Publishing:
    """Send the records at `rate` a second; stamp each first copy of an id as it is sent."""
    records, first_index = workload.records, workload.first_index
    total = len(records)
    sent = 0
    most_behind = 0.0
    acknowledgements = []
    started = time.perf_counter()
    while sent < total:
        due = due_count(time.perf_counter() - started, rate, total)
        most_behind = max(most_behind, (due - sent) / rate - _TICK_SECONDS)
        while sent < due:
            key, value = records[sent]
            stamp = time.perf_counter()
            acknowledgements.append(await producer.send(topic, key=key, value=value))
            if first_index[sent] == sent:
                stamps[sent] = stamp
            sent += 1
        if sent < total:
            next_due = started + (sent + 1) / rate
            await asyncio.sleep(max(next_due - time.perf_counter(), _TICK_SECONDS))
    ended_at = time.perf_counter()
    await asyncio.gather(*acknowledgements)
    return Publishing(
        events=total,
        seconds=ended_at - started,
        most_behind_seconds=max(most_behind, 0.0),
        ended_at=ended_at,
    )


class AlertReader:
    """Reads the alerts topic from its beginning and stamps each alert as it comes in."""

    def __init__(self, settings: Settings, topic: str, *, expected: Iterable[str]) -> None:
        self._settings = settings
        self._topic = topic
        self._missing = set(expected)
        self.arrived: list[ArrivedAlert] = []
        self.positioned = asyncio.Event()
        self.publishing_ended_at = 0.0

    async def run(self, publishing_done: asyncio.Event) -> None:
        reader = new_reader(self._settings)
        await start_client(reader, self._settings)
        try:
            partitions = [TopicPartition(self._topic, p) for p in range(PARTITIONS)]
            reader.assign(partitions)
            await reader.seek_to_beginning(*partitions)
            for tp in partitions:
                await reader.position(tp)
            self.positioned.set()
            last_arrival = time.perf_counter()
            all_in_at: float | None = None
            while True:
                fetched = await reader.getmany(timeout_ms=50)
                now = time.perf_counter()
                for records in fetched.values():
                    for record in records:
                        self._take(record.value, now)
                        last_arrival = now
                if not publishing_done.is_set():
                    continue
                if not self._missing and all_in_at is None:
                    all_in_at = now
                if now >= max(last_arrival, self.publishing_ended_at) + _ALERTS_STALL_SECONDS or (
                    all_in_at is not None and now >= all_in_at + _DUPLICATE_WATCH_SECONDS
                ):
                    return
        finally:
            await reader.stop()

    def _take(self, value: bytes | None, now: float) -> None:
        alert = json.loads(value or b"{}")
        self.arrived.append(
            ArrivedAlert(
                alert_id=str(alert["alert_id"]),
                tenant_id=str(alert["tenant_id"]),
                triggered_by=alert.get("triggered_by"),
                arrived_at=now,
            )
        )
        self._missing.discard(alert["alert_id"])


class ConsumerProcess(WorkerProcess):
    """The budget consumer's process: its metrics and its CPU so far."""

    async def metrics(self) -> dict[str, float]:
        status, text = await self.get("/metrics")
        return metric_totals(text, consumer="budget") if status == 200 else {}

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)


@contextlib.asynccontextmanager
async def budget_consumer_process(
    settings: Settings, *, profile: Path | None
) -> AsyncIterator[ConsumerProcess]:
    """`python -m llm_usage consume budget` on the bench's database and topics (optionally
    under pyinstrument); yields once it has joined its group, stops it with SIGTERM."""
    environment = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        "USAGE_TOPIC": settings.usage_topic,
        "ALERTS_TOPIC": settings.alerts_topic,
        "DLQ_TOPIC": settings.dlq_topic,
        "BUDGET_GROUP_ID": settings.budget_group_id,
        "CONSUMER_MAX_BATCH": str(settings.consumer_max_batch),
        "BUDGET_MAX_BATCH": str(settings.budget_batch()),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }
    consumer: ConsumerProcess | None = None
    try:
        async with ConsumerProcess.running(
            "consume",
            "budget",
            env=environment,
            log_prefix="bench-budget-consumer-",
            name="the budget consumer",
            profile=profile,
            ready_within=_READY_WITHIN_SECONDS,
            stop_within=_STOP_WITHIN_SECONDS,
        ) as consumer:
            yield consumer
    finally:
        if consumer is not None and consumer.process.returncode == -signal.SIGKILL:
            print(f"the budget consumer did not stop on SIGTERM; killed (log: {consumer.log_path})")


@dataclass(frozen=True)
class LatencyRun:
    publishing: Publishing
    last_alert_after_seconds: float  # the last alert's arrival after the last event's publish
    check: AlertCheck
    latency: LatencySummary | None
    # the same latencies in two parts: publish -> decided, decided -> arrived
    split: tuple[LatencySummary, LatencySummary] | None
    outbox: str  # whether the outbox holds exactly the predicted alerts
    consumer_cpu_seconds: float
    harness_cpu_seconds: float  # this process: publisher and alert reader
    wall_seconds: float
    metrics: dict[str, float]
    log_path: Path


async def _run_latency(
    bench: Settings,
    pool: asyncpg.Pool,
    workload: Workload,
    *,
    rate: float,
    profile: Path | None,
) -> LatencyRun:
    stamps = array("d", bytes(8 * len(workload.records)))
    perf_to_wall = time.time() - time.perf_counter()
    reader = AlertReader(bench, bench.alerts_topic, expected=workload.expected)
    publishing_done = asyncio.Event()
    producer = new_producer(bench)
    await start_client(producer, bench)
    try:
        async with budget_consumer_process(bench, profile=profile) as consumer:
            reading = asyncio.create_task(reader.run(publishing_done))
            await asyncio.wait(
                {reading, asyncio.ensure_future(reader.positioned.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if reading.done():
                await reading  # raises what stopped it
            before = await consumer.metrics()
            cpu_before, wall_before = consumer.cpu_seconds(), time.perf_counter()
            harness_before = time.process_time()
            try:
                publishing = await publish_paced(
                    producer, bench.usage_topic, workload, rate=rate, stamps=stamps
                )
            finally:
                reader.publishing_ended_at = time.perf_counter()
                publishing_done.set()
            await reading
            cpu = consumer.cpu_seconds() - cpu_before
            harness_cpu = time.process_time() - harness_before
            wall = time.perf_counter() - wall_before
            after = await consumer.metrics()
    finally:
        await producer.stop()
    latencies = alert_latencies(reader.arrived, workload.index_of, stamps)
    decided = await _decided_alerts(pool, workload.tenant_prefix)
    to_decided, to_arrival = latency_split(
        reader.arrived,
        workload.index_of,
        stamps,
        {alert_id: at for alert_id, (_, at) in decided.items()},
        perf_to_wall=perf_to_wall,
    )
    last_arrival = max((alert.arrived_at for alert in reader.arrived), default=float("nan"))
    return LatencyRun(
        publishing=publishing,
        last_alert_after_seconds=last_arrival - publishing.ended_at,
        check=check_alerts(workload.expected, reader.arrived),
        latency=LatencySummary.of(latencies) if latencies else None,
        split=(LatencySummary.of(to_decided), LatencySummary.of(to_arrival))
        if to_decided
        else None,
        outbox=_outbox_agrees(decided, workload.expected),
        consumer_cpu_seconds=cpu,
        harness_cpu_seconds=harness_cpu,
        wall_seconds=wall,
        metrics={name: after[name] - before.get(name, 0.0) for name in after},
        log_path=consumer.log_path,
    )


@dataclass(frozen=True)
class MemoryRun:
    """The budget consumer's process draining a backlog: its resident memory and batches."""

    batch: int  # BUDGET_MAX_BATCH as the process ran with it
    events: int
    counted: int
    seconds: float  # ready to every event counted
    ready_rss_bytes: int  # VmRSS once it had joined its group, before any batch
    most_sampled_rss_bytes: int  # the largest VmRSS sampled while it drained
    rss_profile: tuple[int, ...]  # VmRSS at 0, 25, 50, 75 and 100 % of the drain
    peak_rss_bytes: int  # VmHWM at the end: its high-water mark since it started
    batches: float
    batch_events: float  # events in those batches
    cpu_seconds: float
    outbox: str
    log_path: Path

    @property
    def mean_batch(self) -> float:
        return self.batch_events / self.batches if self.batches else float("nan")


def memory_verdict(run: MemoryRun) -> str:
    """One line on what the run measured, and whether its batches were full enough to count as
    a measurement at BUDGET_MAX_BATCH."""
    filled = run.mean_batch / run.batch if run.batches else 0.0
    note = (
        ""
        if filled >= 0.5
        else f" (batches averaged {filled:.0%} of {run.batch:,}: not a figure at the batch "
        "size; give more --backlog-events)"
    )
    return (
        f"budget consumer peak RSS {run.peak_rss_bytes / _MIB:.0f} MiB at BUDGET_MAX_BATCH "
        f"{run.batch:,}{note}"
    )


async def _run_memory(
    bench: Settings, pool: asyncpg.Pool, backlog: Workload, *, counted_in_process: int
) -> MemoryRun:
    """The budget consumer as its own process drains `backlog` (already on bench's usage topic)
    with a group of its own, into counters emptied first, until it has counted as many events
    as the in-process run did."""
    # The events too: the budget consumer takes an id the window does not hold but whose event is
    # stored for one older than the window, counted before (the two-tier identity).
    await pool.execute(f"TRUNCATE {', '.join(_DRAIN_TABLES)}")
    async with budget_consumer_process(bench, profile=None) as consumer:
        ready_rss = process_memory(consumer.pid).rss_bytes
        cpu_before = consumer.cpu_seconds()
        started = time.perf_counter()
        samples: list[tuple[float, int]] = [(0.0, ready_rss)]
        counted, moved_at, last_count = 0, started, -1
        while counted < counted_in_process:
            if consumer.process.returncode is not None:
                raise AssertionError(
                    f"the budget consumer exited with {consumer.process.returncode} while "
                    f"draining (log: {consumer.log_path})"
                )
            await asyncio.sleep(_RSS_SAMPLE_SECONDS)
            with contextlib.suppress(OSError, ValueError):  # it may just be exiting
                samples.append(
                    (time.perf_counter() - started, process_memory(consumer.pid).rss_bytes)
                )
            counted = await pool.fetchval("SELECT count(*) FROM usage_event_ids WHERE counted")
            now = time.perf_counter()
            if counted != last_count:
                last_count, moved_at = counted, now
            elif now - moved_at > _DRAIN_STALL_SECONDS:
                raise AssertionError(
                    f"the budget consumer counted nothing for {_DRAIN_STALL_SECONDS:.0f} s at "
                    f"{counted:,} of {counted_in_process:,} events (log: {consumer.log_path})"
                )
        seconds = time.perf_counter() - started
        memory = process_memory(consumer.pid)
        samples.append((seconds, memory.rss_bytes))
        cpu = consumer.cpu_seconds() - cpu_before
        metrics = await consumer.metrics()
    return MemoryRun(
        batch=bench.budget_batch(),
        events=len(backlog.records),
        counted=counted,
        seconds=seconds,
        ready_rss_bytes=ready_rss,
        most_sampled_rss_bytes=max(rss for _, rss in samples),
        rss_profile=tuple(rss_at(samples, _RSS_POINTS)),
        peak_rss_bytes=memory.peak_bytes,
        batches=metrics.get("llm_usage_consumer_batch_size_count", 0.0),
        batch_events=metrics.get("llm_usage_consumer_batch_size_sum", 0.0),
        cpu_seconds=cpu,
        outbox=_outbox_agrees(await _decided_alerts(pool, backlog.tenant_prefix), backlog.expected),
        log_path=consumer.log_path,
    )


# ---------------------------------------------------------------------------------------------
# Draining a backlog in this process: the throughput run and the corrections rounds.


@dataclass(frozen=True)
class Drained:
    usage: TimedRun
    budget: TimedRun
    stored: int  # rows in llm_usage_events once the usage consumer was idle
    counted: int  # ids the budget consumer counted


async def _drain_backlog(bench: Settings, pool: asyncpg.Pool) -> Drained:
    """Into emptied tables, the usage consumer and then the budget consumer drain bench's usage
    topic with bench's groups, each in this process, timed from first fetch to last commit."""
    await pool.execute(f"TRUNCATE {', '.join(_DRAIN_TABLES)}")
    freeze_harness_objects()
    usage = await time_consumer(bench, usage_consumer_spec(bench, CollectorRegistry()))
    stored = await pool.fetchval("SELECT count(*) FROM llm_usage_events")
    budget = await time_consumer(
        bench, budget_consumer_spec(bench, BudgetMetrics.create(CollectorRegistry()))
    )
    counted = await pool.fetchval("SELECT count(*) FROM usage_event_ids WHERE counted")
    return Drained(usage, budget, stored, counted)


def _with_groups(bench: Settings, name: str) -> Settings:
    return bench.model_copy(
        update={"usage_group_id": f"{name}-usage", "budget_group_id": f"{name}-budget"}
    )


async def _run_corrections(
    bench: Settings,
    pool: asyncpg.Pool,
    backlog: Workload,
    *,
    corrections: int,
    rounds: int,
    rng: random.Random,
    now: datetime,
) -> list[CorrectionsRound]:
    """Rounds of the backlog (already on bench's usage topic) drained without and then with
    `corrections` mixed in (published once on a topic of their own), each with fresh groups."""
    mixed = with_corrections(backlog.stream, corrections, rng, now=now)
    corrected = bench.model_copy(update={"usage_topic": f"{bench.usage_topic}-corrected"})
    await ensure_topics(corrected, [corrected.usage_topic], partitions=PARTITIONS)
    published = await publish_backlog(
        corrected, corrected.usage_topic, [(key, value) for key, value, _ in mixed]
    )
    print(
        f"\ncorrections: the backlog with {corrections:,} corrections mixed in, "
        f"{len(mixed):,} records published in {published:.1f} s (not timed); {rounds} "
        f"round{'s' if rounds != 1 else ''} without, then with"
    )
    results: list[CorrectionsRound] = []
    for number in range(1, rounds + 1):
        drains = []
        for settings, name in ((bench, f"{number}"), (corrected, f"{number}k")):
            drained = await _drain_backlog(
                _with_groups(settings, f"{bench.budget_group_id}-{name}"), pool
            )
            if drained.stored != backlog.unique or drained.counted != backlog.unique:
                raise AssertionError(
                    f"round {name}: {drained.stored:,} events stored and {drained.counted:,} "
                    f"counted of {backlog.unique:,} unique"
                )
            drains.append(drained)
        await verify_judged(pool, corrections, consumer="budget")
        plain, with_them = drains
        results.append(
            CorrectionsRound(
                events=len(backlog.records),
                corrections=corrections,
                plain_seconds=plain.budget.seconds,
                corrected_seconds=with_them.budget.seconds,
            )
        )
        print(corrections_round_line(number, results[-1]))
    return results


# ---------------------------------------------------------------------------------------------
# The whole benchmark.


async def _set_policies(pool: asyncpg.Pool, policies: Sequence[BudgetPolicy]) -> None:
    """Through `set_policy` (audited, notified), a few connections at a time."""
    queue = list(policies)

    async def writer() -> None:
        async with pool.acquire() as connection:
            while queue:
                await set_policy(connection, queue.pop(), actor="bench")

    await asyncio.gather(*(writer() for _ in range(_POLICY_WRITERS)))


async def _decided_alerts(
    pool: asyncpg.Pool, tenant_prefix: str
) -> dict[str, tuple[str | None, float]]:
    """The alerts the outbox holds for a workload's tenants: alert_id -> (triggered_by, when
    decided as a Unix time)."""
    rows = await pool.fetch(
        "SELECT alert_id, payload, created_at FROM budget_alert_outbox "
        "WHERE starts_with(tenant_id, $1)",
        tenant_prefix,
    )
    return {
        row["alert_id"]: (json.loads(row["payload"])["triggered_by"], row["created_at"].timestamp())
        for row in rows
    }


def _outbox_agrees(decided: dict[str, tuple[str | None, float]], expected: dict[str, str]) -> str:
    triggers = {alert_id: trigger for alert_id, (trigger, _) in decided.items()}
    if triggers == expected:
        return f"the outbox holds exactly the {len(expected)} predicted alerts"
    missing = len(expected.keys() - triggers.keys())
    extra = len(triggers.keys() - expected.keys())
    other = sum(1 for a, t in triggers.items() if a in expected and expected[a] != t)
    return (
        f"OUTBOX DISAGREES: {missing} predicted alerts missing, {extra} unexpected, "
        f"{other} with another trigger"
    )


async def run_budget_benchmark(
    *,
    rate: int,
    seconds: float,
    tenants: int,
    deployments: int,
    backlog_events: int,
    dup_rate: float,
    profile_consumer: Path | None = None,
    corrections: int = 0,
    corrections_runs: int = 3,
) -> None:
    """Measure alert latency at `rate` events/s for `seconds`, then both consumers' throughput
    on a backlog (and, with `corrections`, the budget consumer's with them mixed in and
    without, `corrections_runs` rounds); print the figures and whether the targets are met."""
    configure_logging(log_format="console", level="WARNING")
    settings = await asyncio.to_thread(settings_for_local_run)
    database_url = await bench_database(settings.database_url, BENCH_DATABASE)
    run_id = uuid.uuid4().hex[:8]
    bench = settings.model_copy(
        update={
            "database_url": database_url,
            "usage_topic": f"bench-{run_id}.budget.usage",
            "dlq_topic": f"bench-{run_id}.budget.usage.dlq",
            "alerts_topic": f"bench-{run_id}.budget.alerts",
            "budget_group_id": f"bench-{run_id}-budget-latency",
            "metrics_port": 0,
        }
    )
    rng = random.Random(run_id)
    now = datetime.now(UTC)
    print(
        f"{os.cpu_count()} cores, Python {platform.python_version()}; run {run_id}; "
        f"database {BENCH_DATABASE}; load average {_load()} (other work shares this machine)"
    )

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=_POLICY_WRITERS)
    assert pool is not None
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
            print(f"PostgreSQL {await connection.fetchval('SHOW server_version')}")
            await connection.execute(f"TRUNCATE {', '.join(_BENCH_TABLES)}")
        await ensure_topics(
            bench, [bench.usage_topic, bench.dlq_topic, bench.alerts_topic], partitions=PARTITIONS
        )

        # 1. Alert latency at a fixed rate, the budget consumer in its own process.
        started = time.perf_counter()
        live = build_workload(
            rng,
            id_prefix=f"bench-{run_id}-live",
            tenant_prefix=f"live-{run_id}-",
            events=round(rate * seconds),
            tenants=tenants,
            deployments=deployments,
            dup_rate=dup_rate,
            now=now,
        )
        await _set_policies(pool, live.policies)
        print(
            f"\nlatency run: {len(live.records):,} events ({live.unique:,} unique) over {tenants} "
            f"tenants, {len(live.policies):,} monthly policies (tenant and {deployments} "
            f"deployments each), {len(live.expected):,} alerts predicted; prepared in "
            f"{time.perf_counter() - started:.1f} s"
        )
        freeze_harness_objects()
        latency = await _run_latency(bench, pool, live, rate=rate, profile=profile_consumer)
        del live

        # 2. Throughput on a backlog: the usage consumer, then the budget consumer.
        backlog = build_workload(
            rng,
            id_prefix=f"bench-{run_id}-backlog",
            tenant_prefix=f"backlog-{run_id}-",
            events=backlog_events,
            tenants=tenants,
            deployments=deployments,
            dup_rate=dup_rate,
            now=now,
        )
        await _set_policies(pool, backlog.policies)
        backlog_bench = bench.model_copy(
            update={
                "usage_topic": f"bench-{run_id}.budget.backlog",
                "usage_group_id": f"bench-{run_id}-usage-backlog",
                "budget_group_id": f"bench-{run_id}-budget-backlog",
            }
        )
        await ensure_topics(backlog_bench, [backlog_bench.usage_topic], partitions=PARTITIONS)
        published = await publish_backlog(backlog_bench, backlog_bench.usage_topic, backlog.records)
        print(
            f"backlog: {len(backlog.records):,} events ({backlog.unique:,} unique), "
            f"{len(backlog.expected):,} alerts predicted; published in {published:.1f} s "
            "(not timed)"
        )
        drained = await _drain_backlog(backlog_bench, pool)
        backlog_outbox = _outbox_agrees(
            await _decided_alerts(pool, backlog.tenant_prefix), backlog.expected
        )

        # 3. Memory: the budget consumer as its own process drains the backlog again.
        memory = await _run_memory(
            backlog_bench.model_copy(update={"budget_group_id": f"bench-{run_id}-budget-memory"}),
            pool,
            backlog,
            counted_in_process=drained.counted,
        )

        # 4. The budget consumer with corrections mixed into the backlog and without.
        rounds = (
            await _run_corrections(
                backlog_bench,
                pool,
                backlog,
                corrections=corrections,
                rounds=corrections_runs,
                rng=random.Random(f"{run_id}-c"),
                now=now,
            )
            if corrections > 0
            else []
        )
    finally:
        await pool.close()

    print(f"\nload average at the end {_load()}")
    _report_latency(latency, rate=rate)
    _report_throughput(
        usage=Measurement("usage consumer", len(backlog.records), drained.usage.seconds),
        budget=Measurement("budget consumer", len(backlog.records), drained.budget.seconds),
        runs=(drained.usage, drained.budget),
        checks=(
            f"usage table holds {drained.stored:,} of {backlog.unique:,} unique events; budget "
            f"consumer counted {drained.counted:,}; {backlog_outbox}"
        ),
    )
    _report_memory(memory)
    if rounds:
        for line in corrections_lines(rounds):
            print(line)


def _load() -> str:
    return " ".join(f"{load:.1f}" for load in os.getloadavg())


def _report_latency(run: LatencyRun, *, rate: int) -> None:
    publishing, check, metrics = run.publishing, run.check, run.metrics
    print(
        f"\nAlert latency, budget consumer as its own process (log: {run.log_path})\n"
        f"  published {publishing.events:,} events in {publishing.seconds:.1f} s = "
        f"{publishing.events / publishing.seconds:,.0f} events/s (asked {rate:,}); at most "
        f"{publishing.most_behind_seconds:.3f} s behind schedule; the last alert arrived "
        f"{run.last_alert_after_seconds:.1f} s after the last event"
    )
    print(
        f"  alerts: {check.expected:,} predicted, {check.arrived:,} arrived, {check.missing} "
        f"missing, {check.unexpected} unexpected, {check.twice} arrived twice, "
        f"{check.other_trigger} triggered by another event than predicted, {check.no_trigger} "
        f"without trigger; {run.outbox}"
    )
    batches = metrics.get("llm_usage_consumer_batch_size_count", 0.0)
    if batches:
        decided = metrics.get("llm_usage_budget_alert_latency_seconds_count", 0.0)
        relay = (
            metrics.get("llm_usage_budget_alert_latency_seconds_sum", 0.0) / decided
            if decided
            else float("nan")
        )
        print(
            f"  consumer: CPU {run.consumer_cpu_seconds:.1f} s in {run.wall_seconds:.1f} s "
            f"({run.consumer_cpu_seconds / run.wall_seconds:.0%} of a core); {batches:,.0f} "
            f"batches of {metrics['llm_usage_consumer_batch_size_sum'] / batches:,.0f} events "
            "on average, each landed in "
            f"{metrics['llm_usage_consumer_batch_duration_seconds_sum'] / batches:.3f} s; "
            f"relay: decided -> acknowledged {relay:.3f} s on average; publisher and reader "
            f"(this process): CPU {run.harness_cpu_seconds:.1f} s"
        )
    if run.latency is None:
        print("  no alert arrived: no latency to report")
        return
    rows = [("event published -> alert on the topic", run.latency)]
    if run.split is not None:
        rows += [
            ("  published -> decided (batch transaction began)", run.split[0]),
            ("  decided -> alert on the topic", run.split[1]),
        ]
    print("\n| latency | alerts | p50 | p95 | p99 | max |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, lat in rows:
        print(
            f"| {name} | {lat.count:,} | {lat.p50:.3f} s | {lat.p95:.3f} s | {lat.p99:.3f} s | "
            f"{lat.max:.3f} s |"
        )
    met = run.latency.p99 < TARGET_P99_SECONDS and check.clean
    print(
        f"target: p99 < {TARGET_P99_SECONDS:g} s at {rate:,} events/s, every alert once: "
        f"{'met' if met else 'MISSED'}"
    )


def _report_throughput(
    *, usage: Measurement, budget: Measurement, runs: tuple[TimedRun, TimedRun], checks: str
) -> None:
    print("\nThroughput on the backlog, each consumer in this process, first fetch to last commit")
    print(f"  {checks}")
    print("\n| consumer | events | seconds | events/s | CPU (whole run) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for measured, run in zip((usage, budget), runs, strict=True):
        print(
            f"| {measured.name} | {measured.events:,} | {measured.seconds:.2f} | "
            f"{measured.rate:,.0f} | {run.cpu_seconds:.1f} s |"
        )
    ratio = budget.rate / usage.rate
    verdict = "met" if ratio >= 1 else "MISSED"
    print(f"budget / usage = {ratio:.2f}   (target >= 1: {verdict})")


def _report_memory(run: MemoryRun) -> None:
    print(
        f"\nMemory: the budget consumer as its own process drains the backlog again (log: "
        f"{run.log_path})\n"
        f"  {run.counted:,} events counted in {run.seconds:.1f} s (CPU {run.cpu_seconds:.1f} s); "
        f"{run.batches:,.0f} batches of {run.mean_batch:,.0f} events on average "
        f"(BUDGET_MAX_BATCH {run.batch:,}, decode-ahead on); {run.outbox}\n"
        f"  RSS once joined {run.ready_rss_bytes / _MIB:.0f} MiB; at 0/25/50/75/100 % of the "
        f"drain {' / '.join(f'{rss / _MIB:.0f}' for rss in run.rss_profile)} MiB; most sampled "
        f"{run.most_sampled_rss_bytes / _MIB:.0f} MiB, peak (VmHWM) "
        f"{run.peak_rss_bytes / _MIB:.0f} MiB"
    )
    print(memory_verdict(run))
