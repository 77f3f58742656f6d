"""`llm-usage bench lifecycle` (and tests/integration/test_partition_lifecycle.py): the usage
consumer, a real `llm-usage consume usage` process, drains a backlog spread over six months while
a maintenance loop does what `llm-usage maintain` does with a "today" that moves on a month every
few rounds: create the months ahead, then detach (CONCURRENTLY), archive, verify and drop the
months past retention (`retire_months`). Against a run without maintenance: the consumer's
batch times (its "Batch landed." lines, logged at DEBUG) and exact counts — every event stored
once, or archived with its month, or dead-lettered `expired` because its month was gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import pyarrow.parquet as pq

from llm_usage.archive.retention import retire_months
from llm_usage.archive.targets import local_target
from llm_usage.bench.support import consumer_environment, publish_backlog
from llm_usage.core.clock import worker_clock
from llm_usage.core.settings import Settings
from llm_usage.domain.periods import add_months, month_start
from llm_usage.kafka.topics import ensure_topics
from llm_usage.local.sample_events import SampleTenant, sample_event
from llm_usage.schemas.dead_letter import REASON_HEADER
from llm_usage.storage.migrate import migrate
from llm_usage.storage.partitions import create_partitions
from llm_usage.testing.processes import WorkerProcess, free_port
from llm_usage.testing.topics import read_to_end

DATA_MONTHS = 6  # the backlog's events occurred in the current month and the five before it
RETENTION_MONTHS = DATA_MONTHS - 1  # at the start every month of the backlog is kept
MONTHS_RETIRED = 4  # the rounds move "today" on by one month each, up to this many
TENANTS = 50
# What the runtime logs when a batch did not land or a row was refused (llm_usage/runtime).
FAILURE_LINES = (
    "Batch did not land; it will be fetched again.",
    "The database refused a record that passed validation; dead-lettering it.",
)
RETRY_LINE = "Retrying after a transient failure."
BATCH_LINE = "Batch landed."


@dataclass(frozen=True)
class LifecycleRun:
    """One drain of the backlog, with or without maintenance, and what became of every event."""

    maintenance: bool
    events: int
    seconds: float
    batch_seconds: list[float]
    failures: list[str]  # log lines saying a batch failed or a row was refused
    retries: int  # batches retried after a transient failure (a month detached meanwhile)
    rounds: int
    months_retired: list[date]
    ids_by_month: dict[date, set[str]]  # what was published
    stored: Counter[str]  # id → rows in the table
    archived: Counter[str]  # id → rows in the archives of the months dropped
    dead_letters: dict[str, Counter[str]] = field(default_factory=dict)  # reason → ids

    @property
    def p99(self) -> float:
        return percentile(self.batch_seconds, 0.99)

    @property
    def p50(self) -> float:
        return percentile(self.batch_seconds, 0.50)

    def count_errors(self) -> list[str]:
        """Every way the counts are not exact; empty when each event is stored once, or archived
        once with its month and not stored, or dead-lettered `expired` once (its month dropped)."""
        errors = []
        retired = set(self.months_retired)
        expired = self.dead_letters.get("expired", Counter())
        for reason, letters in self.dead_letters.items():
            if reason != "expired":
                errors.append(f"{sum(letters.values())} dead letters with reason {reason!r}")
        for month, ids in sorted(self.ids_by_month.items()):
            for name, seen in (("stored", self.stored), ("archived", self.archived)):
                twice = [i for i in ids if seen[i] > 1]
                if twice:
                    errors.append(f"{month}: {len(twice)} ids {name} more than once")
            if month in retired:
                stored = [i for i in ids if self.stored[i]]
                if stored:
                    errors.append(f"{month} (dropped): {len(stored)} ids still in the table")
                both = [i for i in ids if self.archived[i] and expired[i]]
                missing = [i for i in ids if not self.archived[i] and not expired[i]]
                if both:
                    errors.append(f"{month}: {len(both)} ids archived and dead-lettered")
                if missing:
                    errors.append(f"{month}: {len(missing)} ids neither archived nor expired")
            else:
                missing = [i for i in ids if self.stored[i] != 1]
                if missing:
                    errors.append(f"{month} (kept): {len(missing)} ids not stored exactly once")
                late = [i for i in ids if expired[i]]
                if late:
                    errors.append(f"{month} (kept): {len(late)} ids dead-lettered expired")
        return errors

    def expired_count(self) -> int:
        return sum(self.dead_letters.get("expired", Counter()).values())


def percentile(values: list[float], fraction: float) -> float:
    """The `fraction` quantile of `values` (nearest rank, as a p99 of batch times is read)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def backlog(
    count: int, *, now: datetime, seed: int
) -> tuple[list[tuple[bytes, bytes]], dict[date, set[str]]]:
    """`count` events over the current month and the DATA_MONTHS - 1 before it, months mixed
    in publishing order; ids `req-<uuid4>`. Returns the records and the ids of each month."""
    rng = random.Random(seed)
    current = month_start(now.date())
    months = [add_months(current, -back) for back in range(DATA_MONTHS)]
    tenants = [SampleTenant(f"tenant-{i:03d}", ("dep-a", "dep-b")) for i in range(TENANTS)]
    records: list[tuple[bytes, bytes]] = []
    ids: dict[date, set[str]] = {month: set() for month in months}
    for _ in range(count):
        month = rng.choice(months)
        begins = datetime.combine(month, datetime.min.time(), UTC)
        ends = min(datetime.combine(add_months(month, 1), datetime.min.time(), UTC), now)
        occurred = begins + (ends - begins - timedelta(minutes=1)) * rng.random()
        tenant = rng.choice(tenants)
        gateway_request_id = f"req-{uuid.UUID(int=rng.getrandbits(128), version=4)}"
        event = sample_event(
            rng, gateway_request_id=gateway_request_id, tenant=tenant, occurred_at=occurred
        )
        records.append((tenant.tenant_id.encode(), json.dumps(event).encode()))
        ids[month].add(gateway_request_id)
    return records, ids


async def _maintain(
    database_url: str,
    *,
    today: date,
    archive_dir: Path,
    consumer: WorkerProcess,
    interval: float,
    advance_every: int,
) -> tuple[int, list[date]]:
    """Rounds of `llm-usage maintain`'s work while the consumer runs, "today" a month later every
    `advance_every` rounds (up to MONTHS_RETIRED months later), until the consumer has exited and
    every month due has been dropped; returns the rounds run and the months dropped."""
    connection = await asyncpg.connect(database_url)
    target = local_target(archive_dir)
    rounds, dropped = 0, list[date]()
    try:
        while consumer.alive or len(dropped) < MONTHS_RETIRED:
            rounds += 1
            months_on = min(1 + (rounds - 1) // advance_every, MONTHS_RETIRED)
            moving_today = add_months(month_start(today), months_on)
            await create_partitions(
                connection, today=moving_today, retention_months=RETENTION_MONTHS
            )
            for retired in await retire_months(
                connection, today=moving_today, retention_months=RETENTION_MONTHS, target=target
            ):
                if not retired.dropped:
                    raise AssertionError(f"{retired.month}: {retired.report.differences}")
                dropped.append(retired.month)
            if consumer.alive:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(consumer.process.wait()), interval)
    finally:
        await connection.close()
    return rounds, dropped


def _log_entries(path: Path) -> list[dict[str, object]]:
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
    return entries


async def _stored(database_url: str) -> Counter[str]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT gateway_request_id FROM llm_usage_events")
    finally:
        await connection.close()
    return Counter(row[0] for row in rows)


def _archived(archive_dir: Path) -> Counter[str]:
    ids: Counter[str] = Counter()
    for path in archive_dir.rglob("*.parquet"):
        column = pq.read_table(path, columns=["gateway_request_id"]).column(0)
        ids.update(column.to_pylist())
    return ids


async def run_lifecycle(
    settings: Settings,
    *,
    events: int,
    maintenance: bool,
    work_dir: Path,
    interval: float = 1.0,
    advance_every: int = 1,
    batch: int = 500,
    drain_within: float = 600.0,
    seed: int = 20,
) -> LifecycleRun:
    """One drain of `events` by a real usage consumer on `settings.database_url` (an empty
    database: this migrates it), with the maintenance loop or without it."""
    now = worker_clock()()
    today = now.date()
    connection = await asyncpg.connect(settings.database_url)
    try:
        await migrate(connection, today=today, retention_months=RETENTION_MONTHS)
    finally:
        await connection.close()
    base = f"lifecycle-{uuid.uuid4().hex[:8]}"
    settings = settings.model_copy(
        update={
            "usage_topic": f"{base}.usage",
            "dlq_topic": f"{base}.usage.dlq",
            "usage_group_id": f"{base}.group",
            "consumer_max_batch": batch,
        }
    )
    await ensure_topics(settings, [settings.usage_topic, settings.dlq_topic], partitions=3)
    records, ids_by_month = backlog(events, now=now, seed=seed)
    await publish_backlog(settings, settings.usage_topic, records)
    archive_dir = work_dir / f"{base}-archive"
    log_path = work_dir / f"{base}-consumer.log"
    env = {**consumer_environment(settings), "LOG_LEVEL": "DEBUG"}
    consumer = await WorkerProcess.start(
        "consume",
        "usage",
        "--exit-when-idle",
        "3",
        env=env,
        probe_port=free_port(),
        log_path=log_path,
        name="the usage consumer",
    )
    rounds, dropped = 0, list[date]()
    try:
        # Maintenance starts once the consumer has joined its group and is about to fetch.
        await consumer.wait_until_ready(within=90, poll=0.05)
        started = time.perf_counter()
        if maintenance:
            rounds, dropped = await asyncio.wait_for(
                _maintain(
                    settings.database_url,
                    today=today,
                    archive_dir=archive_dir,
                    consumer=consumer,
                    interval=interval,
                    advance_every=advance_every,
                ),
                drain_within,
            )
        code = await asyncio.wait_for(consumer.process.wait(), drain_within)
    finally:
        if consumer.alive:
            await consumer.stop()
    seconds = time.perf_counter() - started - 3.0  # ready to exit, less the idle wait
    if code != 0:
        raise AssertionError(f"the usage consumer exited with {code}: {consumer.log_tail()}")
    entries = _log_entries(log_path)
    dead_letters: dict[str, Counter[str]] = {}
    for record in await read_to_end(settings.kafka_bootstrap_servers, settings.dlq_topic):
        reason = dict(record.headers).get(REASON_HEADER, b"?").decode()
        value = json.loads(record.value or b"{}")
        dead_letters.setdefault(reason, Counter())[str(value.get("gateway_request_id"))] += 1
    run = LifecycleRun(
        maintenance=maintenance,
        events=events,
        seconds=seconds,
        batch_seconds=[float(str(e["seconds"])) for e in entries if e.get("event") == BATCH_LINE],
        failures=[str(e["event"]) for e in entries if e.get("event") in FAILURE_LINES],
        retries=sum(1 for e in entries if e.get("event") == RETRY_LINE),
        rounds=rounds,
        months_retired=dropped,
        ids_by_month=ids_by_month,
        stored=await _stored(settings.database_url),
        archived=_archived(archive_dir) if archive_dir.exists() else Counter(),
        dead_letters=dead_letters,
    )
    log_path.unlink(missing_ok=True)
    shutil.rmtree(archive_dir, ignore_errors=True)
    return run


def report(runs: list[LifecycleRun]) -> list[str]:
    lines = [
        "| maintenance | events | batches | p50 batch ms | p99 batch ms | max batch ms "
        "| events/s | rounds | months dropped | expired | retried batches | failed batches |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        lines.append(
            f"| {'yes' if run.maintenance else 'no'} | {run.events:,} | {len(run.batch_seconds)} "
            f"| {run.p50 * 1000:,.0f} | {run.p99 * 1000:,.0f} "
            f"| {max(run.batch_seconds, default=0) * 1000:,.0f} "
            f"| {run.events / run.seconds:,.0f} | {run.rounds} | {len(run.months_retired)} "
            f"| {run.expired_count():,} | {run.retries} | {len(run.failures)} |"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# The command.


async def _fresh_database(database_url: str, name: str) -> str:
    from llm_usage.bench.support import bench_database  # noqa: PLC0415

    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    return await bench_database(database_url, name)


async def run_lifecycle_benchmark(
    events: int, interval: float, advance_every: int, batch: int
) -> None:
    from llm_usage.local.run import settings_for_local_run  # noqa: PLC0415

    settings = await asyncio.to_thread(settings_for_local_run)
    work_dir = Path(tempfile.mkdtemp(prefix="bench-lifecycle-"))
    runs = []
    try:
        for maintenance in (False, True):
            name = f"llm_usage_bench_lifecycle_{'maintained' if maintenance else 'plain'}"
            url = await _fresh_database(settings.database_url, name)
            run = await run_lifecycle(
                settings.model_copy(update={"database_url": url}),
                events=events,
                maintenance=maintenance,
                work_dir=work_dir,
                interval=interval,
                advance_every=advance_every,
                batch=batch,
            )
            runs.append(run)
            errors = run.count_errors() + run.failures
            print(
                f"{'with' if maintenance else 'without'} maintenance: {events:,} events in "
                f"{run.seconds:,.1f} s, p99 batch {run.p99 * 1000:,.0f} ms; "
                + ("counts exact" if not errors else "; ".join(errors))
            )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print()
    print("\n".join(report(runs)))
    if median_p99 := statistics.median([r.p99 for r in runs if not r.maintenance] or [0.0]):
        maintained = [r.p99 for r in runs if r.maintenance]
        if maintained:
            print(f"p99 with maintenance / without: {maintained[0] / median_p99:.2f}")
