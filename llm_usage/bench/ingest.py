"""`llm-usage bench ingest`: the usage consumer next to two baselines, measured `--runs` times
each (a b c, a b c, ...) in one invocation, on the same machine, database and data.

All three count one unit: rows stored per second (a unique event stored once; the stream holds
about `--dup-rate` re-sends on top, which (a) reads and settles but does not store again).

(a) the usage consumer as its own process (`python -m llm_usage consume usage`, as ops run it).
    A backlog is published to a fresh topic first (not timed); the clock starts when the
    child's `/readyz` first answers 200 (it joined its fresh group), and stops when the group's
    committed offsets reach the topic's end offsets with every unique event in the table. Its
    CPU time (utime + stime from /proc, ready to done, so start-up imports are left out) is
    divided by the events it read; its resident memory is sampled while it drains the backlog.
    It is then stopped with SIGTERM and must exit 0.
(b) the naive service: per event, an existence check and an insert in their own transaction;
(c) the database ceiling: the same rows COPYed straight into the same table, no Kafka.
(k) with `--corrections N`: (a) again on the same stream with N corrections mixed in (design
    §13.2, `bench.support.with_corrections`); k/a compares their rows/s (events only), and its
    records/s counts the corrections too. Every correction must be judged (applied, or parked for
    its event) by the end.
(e) (a) again on the same stream with `--estimated-share` of its unique events sent without a
    charge, so the consumer prices them from the price table. The bench database's price table
    holds the sample models' prices (added, as far as the consumer can tell, days ago) in every
    round, so (a) and (e) pay the same drift check of `upstream_cost_usd`: e/a is the cost of
    estimating alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from llm_usage.bench.support import (
    ChildConsumer,
    Measurement,
    bench_database,
    child_consumer,
    freeze_harness_objects,
    machine_busy_cpu_seconds,
    machine_cores,
    publish_backlog,
    verify_judged,
    with_corrections,
)
from llm_usage.core.errors import UserFacingError
from llm_usage.core.logs import configure_logging
from llm_usage.core.settings import Settings
from llm_usage.kafka.clients import client_options, new_reader, start_client
from llm_usage.kafka.topics import ensure_topics
from llm_usage.local.run import settings_for_local_run
from llm_usage.local.sample_events import sample_price_rows, sample_stream, without_charge
from llm_usage.schemas.decoding import decode_usage_event
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.migrate import migrate
from llm_usage.storage.pool import Connection
from llm_usage.storage.usage_events import USAGE_EVENT_COLUMNS

BENCH_DATABASE = "llm_usage_bench"
PARTITIONS = 6
# The goals, at the median of the runs.
TARGET_A_OVER_C = 0.5
TARGET_A_OVER_B = 20.0
TARGET_CPU_US_PER_EVENT = 20.0
TARGET_PEAK_RSS_MIB = 200.0
TARGET_E_OVER_A = 0.95  # issue 22: 20 % estimated within 5 % of the all-priced stream
TARGET_K_OVER_A = 0.9  # issue 24: 5 % corrections within 10 % of the stream without
MIB = 1024 * 1024

_OFFSETS_POLL_SECONDS = 0.05  # how often the group's committed offsets are read while timing
_RSS_SAMPLE_SECONDS = 0.2
_STALL_SECONDS = 120.0  # no commit moved for this long: the run has failed
_RSS_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # where in the run the RSS profile is shown
_EVENTS_METRIC = "llm_usage_consumer_events_total"
_NAIVE_INSERT = (
    f"INSERT INTO llm_usage_events ({', '.join(USAGE_EVENT_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(USAGE_EVENT_COLUMNS) + 1))})"
)


# ---------------------------------------------------------------------------------------------
# Pure pieces: spreads, the RSS profile, offsets, the child's metrics, the report.


@dataclass(frozen=True)
class Spread:
    """The median of some runs' figures and their range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        ordered = sorted(values)
        if not ordered:
            raise ValueError("no values")
        return cls(median=statistics.median(ordered), low=ordered[0], high=ordered[-1])

    def describe(self, spec: str) -> str:
        """E.g. `0.18 (0.16-0.19)` for spec `.2f`."""
        return f"{self.median:{spec}} ({self.low:{spec}}-{self.high:{spec}})"


def rss_at(samples: Sequence[tuple[float, int]], fractions: Iterable[float]) -> list[int]:
    """For each fraction of the run, the RSS sample taken nearest to that point in time.
    `samples` are (seconds since the run started, bytes), in time order."""
    if not samples:
        raise ValueError("no samples")
    start, end = samples[0][0], samples[-1][0]
    picked = []
    for fraction in fractions:
        moment = start + fraction * (end - start)
        picked.append(min(samples, key=lambda sample: abs(sample[0] - moment))[1])
    return picked


def offsets_reached(
    committed: Mapping[TopicPartition, int], end_offsets: Mapping[TopicPartition, int]
) -> bool:
    """Whether a group has committed every partition up to its end (an empty partition needs
    no commit; a partition without one is at -1)."""
    return all(committed.get(tp, -1) >= end for tp, end in end_offsets.items() if end > 0)


def events_by_result(exposition: str, *, consumer: str = "usage") -> dict[str, int]:
    """The consumer's `llm_usage_consumer_events_total` by result, from its /metrics text."""
    results: dict[str, int] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == _EVENTS_METRIC and sample.labels.get("consumer") == consumer:
                result = sample.labels["result"]
                results[result] = results.get(result, 0) + round(sample.value)
    return results


def assigned_at(log_text: str) -> float | None:
    """Unix time of the child's first "Partitions assigned." line (JSON logs), if any."""
    for line in log_text.splitlines():
        if '"Partitions assigned."' not in line:
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = json.loads(line)
            if entry["event"] == "Partitions assigned.":
                return datetime.fromisoformat(entry["timestamp"]).timestamp()
    return None


@dataclass(frozen=True)
class ConsumerRun:
    """(a) once: the child consumer draining a backlog."""

    rows: int  # unique events stored
    events_read: int  # every record it handled, re-sends included
    seconds: float  # ready -> committed offsets at the end, every row stored
    cpu_seconds: float  # the child's utime + stime over the same span
    rss_samples: tuple[tuple[float, int], ...]  # (seconds since ready, VmRSS bytes)
    peak_rss_bytes: int  # VmHWM at the end: the child's high-water mark since it started
    results: Mapping[str, int]  # the child's own count of what it did with each record
    exit_code: int  # after SIGTERM
    log_path: Path
    # How long after the child logged its assignment this process saw /readyz answer 200: the
    # part of its first batch's work that happened before the clock started.
    clock_late_seconds: float | None
    harness_cpu_seconds: float  # this process meanwhile: polling offsets, sampling memory
    # Every core of the machine over the same span: the consumer, PostgreSQL, Kafka, this
    # harness and whatever else runs here.
    machine_busy_seconds: float

    @property
    def rate(self) -> float:
        return self.rows / self.seconds

    @property
    def cpu_us_per_event(self) -> float:
        return self.cpu_seconds / self.events_read * 1e6

    @property
    def core_share(self) -> float:
        return self.cpu_seconds / self.seconds

    @property
    def machine_cores_busy(self) -> float:
        return self.machine_busy_seconds / self.seconds

    @property
    def machine_us_per_event(self) -> float:
        """The whole machine's CPU per event read: what one event costs beyond the consumer too."""
        return self.machine_busy_seconds / self.events_read * 1e6

    def rate_bound(self, cores: int) -> float:
        """The most rows/s this work could reach with every core busy on it and nothing else:
        the machine's CPU per row, spread over all its cores."""
        return cores * self.rows / self.machine_busy_seconds


@dataclass(frozen=True)
class RunFigures:
    """One round: (a), (b) and (c), all in rows stored per second."""

    consumer: ConsumerRun
    naive: Measurement
    ceiling: Measurement
    estimated: ConsumerRun | None = None  # (e), when measured
    corrected: ConsumerRun | None = None  # (k), when measured

    @property
    def a_over_c(self) -> float:
        return self.consumer.rate / self.ceiling.rate

    @property
    def a_over_b(self) -> float:
        return self.consumer.rate / self.naive.rate

    @property
    def e_over_a(self) -> float | None:
        return None if self.estimated is None else self.estimated.rate / self.consumer.rate

    @property
    def k_over_a(self) -> float | None:
        return None if self.corrected is None else self.corrected.rate / self.consumer.rate

    def a_over_c_bound(self, cores: int) -> float:
        """The a/c this machine could give at most: (a) with all `cores` busy on its work."""
        return self.consumer.rate_bound(cores) / self.ceiling.rate


def _mib(size: float) -> str:
    return f"{size / MIB:.0f}"


def consumer_line(run: ConsumerRun) -> str:
    """One line on a finished (a): rate, CPU, memory over the run, exit."""
    profile = " / ".join(_mib(size) for size in rss_at(run.rss_samples, _RSS_POINTS))
    handled = ", ".join(
        f"{count:,} {result}" for result, count in sorted(run.results.items()) if count
    )
    return (
        f"{run.rows:,} rows from {run.events_read:,} events read ({handled}) in "
        f"{run.seconds:.2f} s = {run.rate:,.0f} rows/s; CPU {run.cpu_seconds:.2f} s = "
        f"{run.cpu_us_per_event:.1f} µs/event ({run.core_share:.0%} of a core); RSS at "
        f"0/25/50/75/100 % of the run {profile} MiB, peak {_mib(run.peak_rss_bytes)} MiB; "
        f"the whole machine meanwhile {run.machine_cores_busy:.2f} cores busy, "
        f"{run.machine_us_per_event:.1f} µs/event; "
        f"exit {run.exit_code} on SIGTERM; clock started "
        + (
            f"{run.clock_late_seconds * 1000:.0f} ms after the child logged its assignment"
            if run.clock_late_seconds is not None
            else "(no assignment logged)"
        )
    )


def run_table(runs: Sequence[RunFigures]) -> list[str]:
    """The figures of every run as a Markdown table (BENCHMARKS.md takes it as it is)."""
    lines = [
        "| run | (a) consumer | (b) naive | (c) COPY ceiling | a/c | a/b | µs/event | peak RSS "
        "| (e) estimated | e/a |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for number, run in enumerate(runs, start=1):
        estimated = (
            "- | -"
            if run.estimated is None or run.e_over_a is None
            else f"{run.estimated.rate:,.0f} rows/s | {run.e_over_a:.3f}"
        )
        lines.append(
            f"| {number} | {run.consumer.rate:,.0f} rows/s | {run.naive.rate:,.0f} rows/s | "
            f"{run.ceiling.rate:,.0f} rows/s | {run.a_over_c:.2f} | {run.a_over_b:.1f} | "
            f"{run.consumer.cpu_us_per_event:.1f} | {_mib(run.consumer.peak_rss_bytes)} MiB | "
            f"{estimated} |"
        )
    return lines


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def summary_lines(runs: Sequence[RunFigures], *, cores: int) -> list[str]:
    """Median and spread (min-max) of each figure, against its goal; and the a/c that the
    machine's `cores` allow at most, from what the whole machine spent per row during (a)."""
    a_over_c = Spread.of(run.a_over_c for run in runs)
    a_over_b = Spread.of(run.a_over_b for run in runs)
    cpu = Spread.of(run.consumer.cpu_us_per_event for run in runs)
    rss = Spread.of(run.consumer.peak_rss_bytes / MIB for run in runs)
    rate = Spread.of(run.consumer.rate for run in runs)
    bound = Spread.of(run.a_over_c_bound(cores) for run in runs)
    machine = Spread.of(run.consumer.machine_us_per_event for run in runs)
    return [
        f"median (min-max) of {len(runs)} run{'s' if len(runs) != 1 else ''}:",
        f"  (a)            {rate.describe(',.0f')} rows/s",
        f"  a/c            {a_over_c.describe('.2f')}   "
        f"target >= {TARGET_A_OVER_C:g}: {_verdict(a_over_c.median >= TARGET_A_OVER_C)}",
        f"  a/c bound      {bound.describe('.2f')}   with all {cores} cores on (a)'s work: the "
        f"whole machine spent {machine.describe('.1f')} µs/event during (a) (an estimate: "
        "other work on the machine counts too)",
        f"  a/b            {a_over_b.describe('.1f')}   "
        f"target >= {TARGET_A_OVER_B:g}: {_verdict(a_over_b.median >= TARGET_A_OVER_B)}",
        f"  consumer CPU   {cpu.describe('.1f')} µs/event   target <= "
        f"{TARGET_CPU_US_PER_EVENT:g}: {_verdict(cpu.median <= TARGET_CPU_US_PER_EVENT)}",
        f"  peak RSS       {rss.describe('.0f')} MiB   target <= {TARGET_PEAK_RSS_MIB:g}: "
        f"{_verdict(rss.high <= TARGET_PEAK_RSS_MIB)}",
        *_estimated_lines(runs),
        *_corrected_lines(runs),
    ]


def _estimated_lines(runs: Sequence[RunFigures]) -> list[str]:
    ratios = [ratio for run in runs if (ratio := run.e_over_a) is not None]
    if not ratios:
        return []
    e_over_a = Spread.of(ratios)
    return [
        f"  e/a            {e_over_a.describe('.3f')}   target >= {TARGET_E_OVER_A:g}: "
        f"{_verdict(e_over_a.median >= TARGET_E_OVER_A)}"
    ]


def _corrected_lines(runs: Sequence[RunFigures]) -> list[str]:
    measured = [(run.corrected, ratio) for run in runs if run.corrected and (ratio := run.k_over_a)]
    if not measured:
        return []
    k_over_a = Spread.of(ratio for _, ratio in measured)
    records = Spread.of(run.events_read / run.seconds for run, _ in measured)
    return [
        f"  k/a            {k_over_a.describe('.3f')}   target >= {TARGET_K_OVER_A:g}: "
        f"{_verdict(k_over_a.median >= TARGET_K_OVER_A)}; (k) read "
        f"{records.describe(',.0f')} records/s, corrections included"
    ]


def load_average() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


# ---------------------------------------------------------------------------------------------
# The benchmark.


async def run_ingest_benchmark(
    *,
    events: int,
    dup_rate: float,
    naive_events: int,
    runs: int = 3,
    estimated_share: float = 0.2,
    corrections: int = 0,
) -> None:
    """Measure (a), (b) and (c) `runs` times each, interleaved, on the same machine, database
    and data; print every run and the median and spread of the ratios."""
    configure_logging(log_format="console", level="WARNING")
    settings = await asyncio.to_thread(settings_for_local_run)
    database_url = await bench_database(settings.database_url, BENCH_DATABASE)
    run_id = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    stream = sample_stream(
        random.Random(run_id), count=events, dup_rate=dup_rate, id_prefix=f"bench-{run_id}", now=now
    )
    unique_events = _unique_events([value for _, value, _ in stream], now=now)
    estimating = _with_estimated_share(stream, estimated_share, run_id)
    correcting = with_corrections(stream, corrections, random.Random(f"{run_id}-c"), now=now)
    print(
        f"{events:,} events ({len(unique_events):,} unique, dup rate {dup_rate}); "
        f"{runs} run{'s' if runs != 1 else ''} of (a), (b), (c); consumer batch "
        f"{settings.consumer_max_batch:,}; {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average {load_average()} (other work shares "
        "this machine)"
    )
    print("unit: rows stored per second (unique events), for (a), (b) and (c) alike")

    figures: list[RunFigures] = []
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=settings.database_pool_size)
    assert pool is not None
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
            await _add_sample_prices(connection, now)
            print(f"PostgreSQL {await connection.fetchval('SHOW server_version')}")
        for number in range(1, runs + 1):
            print(f"\nrun {number} of {runs}, load average {load_average()}")
            bench = _topics_of(
                settings.model_copy(update={"database_url": database_url}),
                f"bench-{run_id}-{number}",
            )
            consumer = await _measure_consumer(bench, stream, pool, len(unique_events))
            print(f"  (a) {consumer_line(consumer)}")
            print(
                f"      this process's CPU while timing {consumer.harness_cpu_seconds:.2f} s; "
                f"consumer log: {consumer.log_path}"
            )
            naive = await _measure_naive(
                pool, [value for _, value, _ in stream[:naive_events]], now
            )
            print(f"  {_measurement_line(naive)}")
            ceiling = await _measure_copy(pool, unique_events)
            print(f"  {_measurement_line(ceiling)}")
            estimated = None
            if estimated_share > 0:
                estimated = await _measure_consumer(
                    _topics_of(bench, f"bench-{run_id}-{number}e"),
                    estimating,
                    pool,
                    len(unique_events),
                )
                share = await pool.fetchval(
                    "SELECT avg(charge_estimated::int) FROM llm_usage_events"
                )
                print(
                    f"  (e) {estimated_share:.0%} without a charge ({share:.1%} of the rows "
                    f"stored estimated): {consumer_line(estimated)}"
                )
            corrected = None
            if corrections > 0:
                corrected = await _measure_consumer(
                    _topics_of(bench, f"bench-{run_id}-{number}k"),
                    correcting,
                    pool,
                    len(unique_events),
                )
                await verify_judged(pool, corrections, consumer="usage")
                print(f"  (k) {corrections:,} corrections mixed in: {consumer_line(corrected)}")
            figures.append(RunFigures(consumer, naive, ceiling, estimated, corrected))
    finally:
        await pool.close()

    print(f"\nload average at the end {load_average()}\n")
    for line in [*run_table(figures), "", *summary_lines(figures, cores=machine_cores())]:
        print(line)


def _topics_of(settings: Settings, name: str) -> Settings:
    """`settings` with topics and a group of their own, named after `name`."""
    return settings.model_copy(
        update={
            "usage_topic": f"{name}.usage",
            "dlq_topic": f"{name}.usage.dlq",
            "usage_group_id": name,
        }
    )


def _with_estimated_share(
    stream: list[tuple[bytes, bytes, dict[str, object]]], share: float, seed: str
) -> list[tuple[bytes, bytes, dict[str, object]]]:
    """`stream` with about `share` of its unique events (every copy alike) sent without a
    charge."""
    chosen: dict[object, bool] = {}
    rng = random.Random(f"{seed}-estimated")
    changed = []
    for key, value, event in stream:
        request_id = event["gateway_request_id"]
        if request_id not in chosen:
            chosen[request_id] = rng.random() < share
        changed.append((key, without_charge(value) if chosen[request_id] else value, event))
    return changed


_ADD_PRICE = """
    INSERT INTO prices (provider, model, effective_from, input, cached_input, output, reasoning,
                        created_at, created_by)
    VALUES ($1, $2, $3, $4, $4, $5, $5, $3, 'bench')
    ON CONFLICT DO NOTHING
"""


async def _add_sample_prices(connection: Connection, now: datetime) -> None:
    """The sample models' prices, as if added a week ago: every event of the stream (the last
    hour) is priced live. Straight into the table, since `prices set` stamps rows with now."""
    added = now - timedelta(days=7)
    for provider, model, input_price, output_price in sample_price_rows():
        await connection.execute(_ADD_PRICE, provider, model, added, input_price, output_price)


def _measurement_line(measured: Measurement) -> str:
    return (
        f"{measured.name}: {measured.events:,} rows in {measured.seconds:.2f} s = "
        f"{measured.rate:,.0f} rows/s"
    )


def _unique_events(values: list[bytes], *, now: datetime) -> list[UsageRow]:
    seen: dict[str, UsageRow] = {}
    for value in values:
        decoded = decode_usage_event(value, now=now)
        assert isinstance(decoded, UsageRow), decoded
        seen.setdefault(decoded.gateway_request_id, decoded)
    return list(seen.values())


async def _measure_consumer(
    bench: Settings,
    stream: list[tuple[bytes, bytes, dict[str, object]]],
    pool: asyncpg.Pool,
    unique: int,
) -> ConsumerRun:
    """(a): publish the backlog (not timed), run the child until it has drained it, check it."""
    await ensure_topics(bench, [bench.usage_topic, bench.dlq_topic], partitions=PARTITIONS)
    admin = AIOKafkaAdminClient(**client_options(bench))
    await admin.start()
    try:
        seconds = await publish_backlog(bench, bench.usage_topic, [(k, v) for k, v, _ in stream])
        end_offsets = await _end_offsets(bench, bench.usage_topic)
        if sum(end_offsets.values()) != len(stream):
            raise AssertionError(f"{bench.usage_topic} holds {sum(end_offsets.values())} records")
        print(f"  published {len(stream):,} events in {seconds:.1f} s (not timed)")
        await pool.execute(
            "TRUNCATE llm_usage_events, usage_event_ids, usage_daily_totals, usage_corrections, "
            "usage_event_effective, correction_waits"
        )
        freeze_harness_objects()
        run = await _drain(bench, admin, pool, end_offsets, unique)
        await _verify_stored(pool, unique)
        return run
    finally:
        with contextlib.suppress(KafkaError, OSError):
            await admin.delete_topics([bench.usage_topic, bench.dlq_topic])
        await admin.close()


async def _end_offsets(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    reader = new_reader(settings)
    await start_client(reader, settings)
    try:
        partitions = [TopicPartition(topic, partition) for partition in range(PARTITIONS)]
        ends: dict[TopicPartition, int] = await reader.end_offsets(partitions)
        return ends
    finally:
        await reader.stop()


async def _drain(
    bench: Settings,
    admin: AIOKafkaAdminClient,
    pool: asyncpg.Pool,
    end_offsets: dict[TopicPartition, int],
    unique: int,
) -> ConsumerRun:
    async with child_consumer(bench, "usage") as child:
        started, cpu_at_ready = child.ready_at, child.cpu_seconds()
        machine_at_ready = machine_busy_cpu_seconds()
        ready_wall = time.time() - (time.perf_counter() - started)
        samples: list[tuple[float, int]] = [(0.0, child.memory().rss_bytes)]
        sampling = asyncio.create_task(_sample_rss(child, samples))
        harness_cpu_at_ready = time.process_time()
        try:
            done_at = await _wait_until_drained(
                bench, admin=admin, pool=pool, child=child, end_offsets=end_offsets, unique=unique
            )
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        cpu_seconds = child.cpu_seconds() - cpu_at_ready
        machine_busy_seconds = machine_busy_cpu_seconds() - machine_at_ready
        harness_cpu_seconds = time.process_time() - harness_cpu_at_ready
        memory = child.memory()
        samples.append((time.perf_counter() - started, memory.rss_bytes))
        status, exposition = await child.get("/metrics")
        results = events_by_result(exposition) if status == 200 else {}
        exit_code = await child.stop()
    assigned = assigned_at(child.log_path.read_text(errors="replace"))
    if exit_code != 0:
        raise UserFacingError(
            f"the usage consumer exited with {exit_code} on SIGTERM; its log "
            f"({child.log_path}) ends with:\n{child.log_tail()}"
        )
    return ConsumerRun(
        rows=unique,
        events_read=sum(results.values()) or sum(end_offsets.values()),
        seconds=done_at - started,
        cpu_seconds=cpu_seconds,
        rss_samples=tuple(samples),
        peak_rss_bytes=memory.peak_bytes,
        results=results,
        exit_code=exit_code,
        log_path=child.log_path,
        clock_late_seconds=None if assigned is None else ready_wall - assigned,
        harness_cpu_seconds=harness_cpu_seconds,
        machine_busy_seconds=machine_busy_seconds,
    )


async def _sample_rss(child: ChildConsumer, samples: list[tuple[float, int]]) -> None:
    while True:
        await asyncio.sleep(_RSS_SAMPLE_SECONDS)
        with contextlib.suppress(OSError, ValueError):  # it may just be exiting
            samples.append((time.perf_counter() - child.ready_at, child.memory().rss_bytes))


async def _wait_until_drained(
    bench: Settings,
    *,
    admin: AIOKafkaAdminClient,
    pool: asyncpg.Pool,
    child: ChildConsumer,
    end_offsets: dict[TopicPartition, int],
    unique: int,
) -> float:
    """perf_counter() when the group's committed offsets were first seen at the end offsets
    with every unique event stored. The consumer commits only what it stored, so the count
    (run once the offsets are there) confirms what already held when they were read."""
    group, partitions = bench.usage_group_id, list(end_offsets)
    coordinator: int | None = None
    committed_total, moved_at = -1, time.perf_counter()
    reached_at: float | None = None
    while True:
        if child.process.returncode is not None:
            raise UserFacingError(
                f"the usage consumer exited with {child.process.returncode} while draining; "
                f"its log ({child.log_path}) ends with:\n{child.log_tail()}"
            )
        now = time.perf_counter()
        if reached_at is None:
            try:
                if coordinator is None:
                    coordinator = await admin.find_coordinator(group)
                answer = await admin.list_consumer_group_offsets(group, coordinator, partitions)
            except KafkaError:
                coordinator = None  # moved or still loading: ask again next time
                answer = {}
            committed = {tp: meta.offset for tp, meta in answer.items()}
            now = time.perf_counter()
            if offsets_reached(committed, end_offsets):
                reached_at = now
            elif sum(committed.values()) != committed_total:
                committed_total, moved_at = sum(committed.values()), now
            elif now - moved_at > _STALL_SECONDS:
                raise UserFacingError(
                    f"the usage consumer committed nothing for {_STALL_SECONDS:.0f} s "
                    f"(log: {child.log_path})"
                )
        if reached_at is not None:
            stored = await pool.fetchval("SELECT count(*) FROM llm_usage_events")
            if stored >= unique:
                return max(reached_at, now)
            if time.perf_counter() - reached_at > _STALL_SECONDS:
                raise AssertionError(f"offsets at the end, but {stored} of {unique} rows stored")
        await asyncio.sleep(_OFFSETS_POLL_SECONDS)


async def _verify_stored(pool: asyncpg.Pool, expected: int) -> None:
    stored = await pool.fetchval("SELECT count(*) FROM llm_usage_events")
    if stored != expected:
        raise AssertionError(f"the consumer stored {stored} rows, expected {expected}")


async def _measure_copy(pool: asyncpg.Pool, rows: list[UsageRow]) -> Measurement:
    await pool.execute("TRUNCATE llm_usage_events, usage_event_ids")
    async with pool.acquire() as connection:
        started = time.perf_counter()
        await connection.copy_records_to_table(
            "llm_usage_events", records=rows, columns=list(USAGE_EVENT_COLUMNS)
        )
        seconds = time.perf_counter() - started
    return Measurement("(c) ceiling: COPY into the table, no Kafka", len(rows), seconds)


async def _measure_naive(pool: asyncpg.Pool, values: list[bytes], now: datetime) -> Measurement:
    """Rows stored per second: the first `len(values)` events hold re-sends too."""
    await pool.execute("TRUNCATE llm_usage_events, usage_event_ids")
    async with pool.acquire() as connection:
        started = time.perf_counter()
        for value in values:
            event = decode_usage_event(value, now=now)
            assert isinstance(event, UsageRow), event
            async with connection.transaction():
                known = await connection.fetchval(
                    "SELECT 1 FROM llm_usage_events WHERE gateway_request_id = $1",
                    event.gateway_request_id,
                )
                if not known:
                    await connection.execute(_NAIVE_INSERT, *event)
        seconds = time.perf_counter() - started
        stored = await connection.fetchval("SELECT count(*) FROM llm_usage_events")
    return Measurement("(b) naive: check + insert per event, no Kafka", stored, seconds)
