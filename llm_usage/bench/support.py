"""Pieces every `llm-usage bench` command shares: a database of its own, a backlog published
before the clock starts, a consumer timed from its first fetch to its last commit in this process,
or run as its own process and watched through /proc."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import random
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from prometheus_client import CollectorRegistry, Histogram

from llm_usage.core.settings import Settings
from llm_usage.kafka.clients import new_producer, start_client
from llm_usage.runtime.ahead import PreparesAhead
from llm_usage.runtime.handler import (
    BatchHandler,
    BatchOutcome,
    ConsumerContext,
    ConsumerSpec,
    Record,
)
from llm_usage.runtime.process import run_consumer, tune_collector_for_batches
from llm_usage.schemas.usage_correction import CORRECTION_EVENT_TYPE
from llm_usage.testing.processes import WorkerProcess


@dataclass(frozen=True)
class Measurement:
    name: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


@dataclass(frozen=True)
class TimedRun:
    """A consumer's busy time (first fetch to last commit) and its process's CPU for the run."""

    seconds: float
    cpu_seconds: float


async def bench_database(database_url: str, name: str) -> str:
    """A database of its own on the same server, so a benchmark never touches real usage."""
    parts = urlsplit(database_url)
    bench_url = urlunsplit(parts._replace(path=f"/{name}"))
    connection = await asyncpg.connect(database_url)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return bench_url


async def publish_backlog(
    settings: Settings, topic: str, records: Sequence[tuple[bytes, bytes]]
) -> float:
    """Publish (key, value) records as fast as the producer goes; return the seconds it took."""
    producer = new_producer(settings, linger_ms=20, max_batch_size=256 * 1024)
    await start_client(producer, settings)
    started = time.perf_counter()
    try:
        sent = [await producer.send(topic, key=key, value=value) for key, value in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return time.perf_counter() - started


def freeze_harness_objects() -> None:
    """The harness holds every event for its checks; a real consumer process holds one batch.
    Freezing them keeps the garbage collector from rescanning them while a consumer is timed."""
    gc.collect()
    gc.freeze()


class LandingClock:
    """Wraps a consumer's handler to time it from its first landing to its last commit.

    The handler sees when each landing begins, not when its offsets are committed: the
    runtime's batch-duration histogram (fetched to committed, per batch) measures that.
    """

    def __init__(self, handler: BatchHandler, batch_seconds: Histogram, name: str) -> None:
        self._handler = handler
        self._batch_seconds = batch_seconds
        self._labels = {"consumer": name}
        self._first_began: float | None = None
        self._last_began = 0.0
        self._landed_before_last = -1.0  # batch seconds observed when the last landing began

    def busy_seconds(self) -> float | None:
        """From the first landing's start to the last one's offset commit; None if none."""
        if self._first_began is None:
            return None
        last_commit = self._last_began + self.landed_seconds() - self._landed_before_last
        return last_commit - self._first_began

    def landed_seconds(self) -> float:
        """The batch durations observed so far, summed."""
        for metric in self._batch_seconds.collect():
            for sample in metric.samples:
                if sample.name.endswith("_sum") and sample.labels == self._labels:
                    return sample.value
        return 0.0  # no batch landed yet

    def prepare_ahead(self, records: Sequence[Record]) -> None:
        if isinstance(self._handler, PreparesAhead):
            self._handler.prepare_ahead(records)

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome:
        now, landed = time.perf_counter(), self.landed_seconds()
        # A landing observes its duration once committed: an unchanged sum is the same
        # landing calling again (a retry, a refused row split off), not a new one.
        if landed != self._landed_before_last:
            self._last_began, self._landed_before_last = now, landed
            if self._first_began is None:
                self._first_began = now
        return await self._handler.record_batch(records)


async def time_consumer(settings: Settings, spec: ConsumerSpec) -> TimedRun:
    """Run `spec` in this process until it has been idle for a second; time its busy part. The
    garbage collector runs as `llm-usage consume` sets it for a consumer's process (cli/consume.py)
    while the consumer runs, and as before after it."""
    thresholds = gc.get_threshold()
    tune_collector_for_batches()
    try:
        return await _time_consumer(settings, spec)
    finally:
        gc.set_threshold(*thresholds)


async def _time_consumer(settings: Settings, spec: ConsumerSpec) -> TimedRun:
    clocks: list[LandingClock] = []

    def make_handler(context: ConsumerContext) -> BatchHandler:
        handler = spec.make_handler(context)
        clocks.append(LandingClock(handler, context.metrics.batch_duration, spec.name))
        return clocks[-1]

    cpu_before = time.process_time()
    await run_consumer(
        settings,
        dataclasses.replace(spec, make_handler=make_handler),
        exit_when_idle=1.0,
        registry=CollectorRegistry(),
    )
    cpu_seconds = time.process_time() - cpu_before
    (clock,) = clocks
    seconds = clock.busy_seconds()
    if seconds is None:
        raise AssertionError(f"the {spec.name} consumer fetched nothing from {spec.topic}")
    return TimedRun(seconds=seconds, cpu_seconds=cpu_seconds)


# ---------------------------------------------------------------------------------------------
# A consumer as its own process (`python -m llm_usage consume <worker>`, as ops run it), and
# what Linux's /proc says about it: CPU time (utime + stime, all threads) and resident memory.

_KIB = 1024


@dataclass(frozen=True)
class ProcessMemory:
    rss_bytes: int  # VmRSS: resident now
    peak_bytes: int  # VmHWM: the most it was ever resident (the kernel's high-water mark)


def cpu_seconds_from_stat(stat: str, clock_ticks: int) -> float:
    """User + system CPU seconds from the text of /proc/<pid>/stat (threads included).

    The command name (field 2) is in parentheses and may hold spaces or parentheses itself, so
    the fields are counted from the last ')': utime and stime are fields 14 and 15.
    """
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / clock_ticks


def memory_from_status(status: str) -> ProcessMemory:
    """VmRSS and VmHWM from the text of /proc/<pid>/status, in bytes."""
    values: dict[str, int] = {}
    for line in status.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            amount, unit = rest.split()
            if unit != "kB":
                raise ValueError(f"unexpected unit {unit!r} for {name}")
            values[name] = int(amount) * _KIB
    if len(values) != 2:
        raise ValueError("no VmRSS/VmHWM lines (a kernel thread, or a process that exited?)")
    return ProcessMemory(rss_bytes=values["VmRSS"], peak_bytes=values["VmHWM"])


def busy_cpu_seconds_from_stat(stat: str, clock_ticks: int) -> float:
    """CPU seconds the whole machine spent working, all cores, from the text of /proc/stat.

    Its first line sums every core: user, nice, system, idle, iowait, irq, softirq, steal, ...
    Busy is user + nice + system + irq + softirq; idle and iowait are not work, and steal is
    time the hypervisor gave to someone else (guest time is already inside user).
    """
    label, *ticks = stat.split("\n", 1)[0].split()
    if label != "cpu" or len(ticks) < 8:
        raise ValueError(f"not the summed cpu line of /proc/stat: {stat[:60]!r}")
    user, nice, system, _idle, _iowait, irq, softirq = (int(t) for t in ticks[:7])
    return (user + nice + system + irq + softirq) / clock_ticks


def cores_from_stat(stat: str) -> int:
    """How many cores the first line of /proc/stat sums: one `cpuN` line each."""
    return sum(1 for line in stat.splitlines() if re.match(r"cpu[0-9]+ ", line))


def machine_busy_cpu_seconds() -> float:
    return busy_cpu_seconds_from_stat(Path("/proc/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def machine_cores() -> int:
    return cores_from_stat(Path("/proc/stat").read_text())


def process_cpu_seconds(pid: int) -> float:
    return cpu_seconds_from_stat(Path(f"/proc/{pid}/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def process_memory(pid: int) -> ProcessMemory:
    return memory_from_status(Path(f"/proc/{pid}/status").read_text())


class ChildConsumer(WorkerProcess):
    """A consumer process, and what Linux's /proc says about it."""

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def memory(self) -> ProcessMemory:
        return process_memory(self.pid)


def consumer_environment(settings: Settings) -> dict[str, str]:
    """This process's environment with the settings a bench changed (database, topics, groups,
    batch size); logs as JSON at INFO."""
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        "USAGE_TOPIC": settings.usage_topic,
        "DLQ_TOPIC": settings.dlq_topic,
        "ALERTS_TOPIC": settings.alerts_topic,
        "USAGE_GROUP_ID": settings.usage_group_id,
        "BUDGET_GROUP_ID": settings.budget_group_id,
        "CONSUMER_MAX_BATCH": str(settings.consumer_max_batch),
        "DATABASE_POOL_SIZE": str(settings.database_pool_size),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }


@contextlib.asynccontextmanager
async def child_consumer(
    settings: Settings,
    worker: str,
    *,
    ready_poll_seconds: float = 0.01,
    ready_within_seconds: float = 90.0,
) -> AsyncIterator[ChildConsumer]:
    """`python -m llm_usage consume <worker>` with `settings`; yields once `/readyz` answers
    200 (it joined its group), polled every `ready_poll_seconds`. Logs go to a file that is
    kept. A child still running when the block ends is stopped with SIGTERM."""
    async with ChildConsumer.running(
        "consume",
        worker,
        env=consumer_environment(settings),
        log_prefix=f"bench-{worker}-consumer-",
        name=f"the {worker} consumer",
        ready_within=ready_within_seconds,
        ready_poll=ready_poll_seconds,
    ) as child:
        yield child


# ---------------------------------------------------------------------------------------------
# Corrections mixed into a backlog (`bench ingest|budget --corrections N`, design §13.2): the
# same mix for both benches, generated once here.

StreamRecord = tuple[bytes, bytes, dict[str, Any]]
VOID_SHARE = 0.4  # of all corrections; amends are 0.5, corrections of corrections 0.1
RECORRECTED_SHARE = 0.1
EARLY_SHARE = 0.01  # sent before their event (they wait for it)


def _correction(
    event: dict[str, Any], number: int, *, action: str, occurred_at: datetime, rng: random.Random
) -> dict[str, Any]:
    correction: dict[str, Any] = {
        "event_type": CORRECTION_EVENT_TYPE,
        "schema_version": 1,
        "correction_id": f"{event['gateway_request_id']}-c{number}",
        "gateway_request_id": event["gateway_request_id"],
        "tenant_id": event["tenant_id"],
        "action": action,
        "reason": "bench",
        "actor": "bench@localhost",
        "occurred_at": occurred_at.isoformat().replace("+00:00", "Z"),
        "event_occurred_at": event["occurred_at"],
    }
    if action == "amend":
        charge = Decimal(event["customer_charge_usd"]) * rng.choice([Decimal("0.5"), Decimal(2)])
        correction["fields"] = {
            "input_tokens": rng.randint(0, 2 * event["input_tokens"]),
            "output_tokens": event["output_tokens"],
            "customer_charge_usd": str(charge),
            "user_id": rng.choice([event.get("user_id"), "bench-moved-user"]),
        }
    return correction


def with_corrections(
    stream: Sequence[StreamRecord], count: int, rng: random.Random, *, now: datetime
) -> list[StreamRecord]:
    """`stream` with `count` corrections of its events mixed in, keyed by tenant as the events:
    40 % voids, 50 % amends, 10 % second corrections of an event already corrected (later by
    `occurred_at`, so they win); each after its event, but 1 % before it."""
    first_seen: dict[str, int] = {}
    for position, (_, _, event) in enumerate(stream):
        first_seen.setdefault(event["gateway_request_id"], position)
    again = round(count * RECORRECTED_SHARE)
    firsts = count - again
    if firsts > len(first_seen) or again > firsts:
        raise ValueError(f"{count} corrections need more than {len(first_seen)} distinct events")
    targets = rng.sample(sorted(first_seen), firsts)
    voids = round(count * VOID_SHARE)
    early = set(rng.sample(range(firsts), round(count * EARLY_SHARE)))
    inserted: list[tuple[int, int, StreamRecord]] = []  # (before which position, order, record)
    for number, request_id in enumerate(targets):
        position = first_seen[request_id]
        key, _, event = stream[position]
        action = "void" if number < voids else "amend"
        decided = now - timedelta(seconds=120 - rng.random())
        correction = _correction(event, 1, action=action, occurred_at=decided, rng=rng)
        at = rng.randint(0, position) if number in early else rng.randint(position + 1, len(stream))
        inserted.append((at, number, (key, json.dumps(correction).encode(), correction)))
        if number < again:  # corrected again, later: an amend over it
            later = _correction(
                event, 2, action="amend", occurred_at=now - timedelta(seconds=60), rng=rng
            )
            inserted.append(
                (max(at, position + 1), count + number, (key, json.dumps(later).encode(), later))
            )
    mixed: list[StreamRecord] = []
    pending = sorted(inserted, key=lambda entry: entry[:2])
    index = 0
    for position in range(len(stream) + 1):
        while index < len(pending) and pending[index][0] == position:
            mixed.append(pending[index][2])
            index += 1
        if position < len(stream):
            mixed.append(stream[position])
    return mixed


# What each consumer keeps of a correction it applied (a correction it could not apply yet waits
# in `correction_waits` under its name).
_APPLIED_CORRECTIONS = {
    "usage": "SELECT count(*) FROM usage_corrections WHERE verdict = 'applied'",
    "budget": "SELECT count(*) FROM budget_corrections",
}


async def verify_judged(pool: asyncpg.Pool, expected: int, *, consumer: str) -> None:
    """Every correction `consumer` read applied, or parked for an event (or, for the budget, a
    usage verdict) that came after it: the wait's retry is not timed."""
    judged = await pool.fetchval(
        f"SELECT ({_APPLIED_CORRECTIONS[consumer]}) "
        "+ (SELECT count(*) FROM correction_waits WHERE consumer = $1)",
        consumer,
    )
    if judged != expected:
        raise AssertionError(
            f"the {consumer} consumer judged {judged} corrections, expected {expected}"
        )
