"""`llm-usage bench rollup` and `llm-usage bench ingest-aggregate`: what the rollup's daily
pre-aggregate buys (`rollup run` for a month against the raw per-month GROUP BY over the events)
and what it costs (the usage consumer's throughput with and without it), each measured against
its baseline in the same run, on the same data.

`bench rollup` does not push millions of events through Kafka (10 million would take a quarter of
an hour here). It loads them the way the usage consumer writes them: in transactions of one
consumer batch, each COPYing the batch's events into `llm_usage_events` (`copy_usage_events`)
and adding their exact daily sums to `usage_daily_totals` (`daily_totals` and
`add_to_daily_totals`), in event time order, as a gateway publishes them.

`rollup run` is timed the way the command runs it (a connection of its own each time) and also
run after run on one connection, the way a long-lived `rollup schedule` runs it: there asyncpg
keeps its statements prepared and PostgreSQL may plan them generically after five executions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import random
import shutil
import statistics
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from decimal import Decimal
from itertools import islice

import asyncpg
from prometheus_client import CollectorRegistry

from llm_usage.bench.support import (
    bench_database,
    freeze_harness_objects,
    publish_backlog,
    time_consumer,
)
from llm_usage.consumers.usage.consumer import usage_consumer_spec
from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.core.errors import ConfigurationError, UserFacingError
from llm_usage.core.logs import configure_logging
from llm_usage.core.settings import Settings
from llm_usage.domain.invoices import USAGE_KIND, InvoiceLine
from llm_usage.domain.money import usd_to_cents
from llm_usage.domain.periods import next_month, parse_period, period_of
from llm_usage.domain.usage import Usage
from llm_usage.kafka.topics import ensure_topics
from llm_usage.local.run import settings_for_local_run
from llm_usage.local.sample_events import SampleTenant, sample_stream
from llm_usage.rollup.run import run_rollup
from llm_usage.runtime.handler import ConsumerContext
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.invoice_lines import GroupUsage
from llm_usage.storage.migrate import migrate
from llm_usage.storage.pool import Connection, create_pool
from llm_usage.storage.usage_events import copy_usage_events
from llm_usage.storage.usage_totals import add_to_daily_totals, daily_totals

ROLLUP_DATABASE = "llm_usage_bench_rollup"
AGGREGATE_DATABASE = "llm_usage_bench_aggregate"

# The seed's query: a month's usage per tenant and deployment straight from the raw events.
RAW_MONTH_QUERY = """
    SELECT tenant_id, deployment_id, sum(customer_charge_usd), sum(input_tokens),
           sum(output_tokens), count(*)
    FROM llm_usage_events
    WHERE occurred_at >= $1 AND occurred_at < $2
    GROUP BY 1, 2
"""

# ---------------------------------------------------------------------------------------------
# Pure pieces: arguments, the synthetic month, the check that the two answers agree.


def parse_sizes(text: str, *, events: int) -> list[int]:
    """`--sizes 1000000,10000000` as ascending event counts, each at most `events`; `events`
    itself is always the last size measured."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigurationError(
            f"--sizes {text!r}: give event counts separated by commas, e.g. 1000000,10000000"
        ) from None
    if not sizes or any(size < 1 for size in sizes):
        raise ConfigurationError(f"--sizes {text!r}: every size must be at least 1")
    if sizes != sorted(set(sizes)):
        raise ConfigurationError(f"--sizes {text!r}: sizes must grow, each once")
    if sizes[-1] > events:
        raise ConfigurationError(
            f"--sizes {text!r}: {sizes[-1]} is more than --events {events}; raise --events"
        )
    return sizes if sizes[-1] == events else [*sizes, events]


def previous_period(now: datetime) -> str:
    """The last whole UTC month before `now`: the month an invoice run bills."""
    first_of_this_month = now.astimezone(UTC).date().replace(day=1)
    return period_of(first_of_this_month - timedelta(days=1))


# (provider, model, input, output): 1e-10 USD per token, i.e. USD per million tokens x 10,000.
# The prices of sample_events.py, so the charges look like the gateway's; integers, so every
# charge is an exact decimal with at most 10 digits after the point and costs no Decimal maths.
_MODELS = (
    ("openai", "gpt-4o-mini", 1_500, 6_000),
    ("openai", "gpt-4o", 25_000, 100_000),
    ("anthropic", "claude-3-5-sonnet", 30_000, 150_000),
    ("anthropic", "claude-3-5-haiku", 8_000, 40_000),
    ("google", "gemini-1.5-flash", 750, 3_000),
)
_MARKUP_PERCENT = 120  # flat 20 % over the provider's price, as in sample_events.py
_CHANNELS = ("web", "api", "slack")
_FEATURES = ("chat", "summarize", "classify")
_USERS = tuple(f"user-{n}" for n in range(1, 41))


def tenant_ids(tenants: int) -> list[str]:
    return [f"tenant-{n:05d}" for n in range(tenants)]


def deployment_ids(deployments: int) -> list[str]:
    return [f"deployment-{n}" for n in range(1, deployments + 1)]


def month_events(
    rng: random.Random,
    *,
    count: int,
    period: str,
    id_prefix: str,
    tenants: int,
    deployments: int,
) -> Iterator[UsageRow]:
    """`count` valid, priced events spread evenly over the UTC month `period`, in time order
    (as a gateway publishes them), each of a random tenant and one of its deployments. Charges
    are exact decimals; ids are `{id_prefix}-{n}`, unique within the call."""
    first_day = parse_period(period)
    start = datetime.combine(first_day, clock_time(), tzinfo=UTC)
    span_us = (next_month(first_day) - first_day).days * 86_400 * 1_000_000
    slot_us = span_us // count
    tenant_names = tenant_ids(tenants)
    deployment_names = deployment_ids(deployments)
    uniform = rng.random
    for n in range(count):
        provider, model, input_price, output_price = _MODELS[int(uniform() * len(_MODELS))]
        input_tokens = 50 + int(uniform() * 5951)
        output_tokens = 10 + int(uniform() * 1491)
        upstream = input_tokens * input_price + output_tokens * output_price  # 1e-10 USD
        charge = upstream * _MARKUP_PERCENT // 100  # exact: every price is a multiple of 5
        yield UsageRow(
            gateway_request_id=f"{id_prefix}-{n}",
            tenant_id=tenant_names[int(uniform() * tenants)],
            deployment_id=deployment_names[int(uniform() * deployments)],
            user_id=_USERS[int(uniform() * len(_USERS))],
            agent_id=None,
            channel=_CHANNELS[int(uniform() * 3)],
            feature=_FEATURES[int(uniform() * 3)],
            provider=provider,
            model=model,
            request_kind="chat.completions",
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=int(uniform() * (input_tokens // 4 + 1)),
            reasoning_tokens=0,
            total_tokens=input_tokens + output_tokens,
            upstream_cost_usd=Decimal(upstream).scaleb(-10),
            customer_charge_usd=Decimal(charge).scaleb(-10),
            customer_charge_cents=(charge + 50_000_000) // 100_000_000,
            markup_mode="flat_percent",
            occurred_at=start
            + timedelta(microseconds=n * span_us // count + int(uniform() * slot_us)),
        )


def batches(events: Iterator[UsageRow], size: int) -> Iterator[list[UsageRow]]:
    while batch := list(islice(events, size)):
        yield batch


def disagreements(lines: Sequence[InvoiceLine], raw: Sequence[GroupUsage]) -> list[str]:
    """How the rollup's usage lines differ from what the raw events say they must be (the
    contract: amount round_half_up(exact sum x 100), qty input + output, meta's token counts and
    requests, 0-cent lines left out, one line per tenant and deployment); empty when they agree."""
    problems: list[str] = []
    expected: dict[tuple[str, str | None], tuple[int, int, int, int, int]] = {}
    for tenant_id, deployment_id, usage in raw:
        cents = usd_to_cents(usage.charge_usd)
        if cents != 0:
            expected[(tenant_id, deployment_id)] = (
                cents,
                usage.input_tokens + usage.output_tokens,
                usage.input_tokens,
                usage.output_tokens,
                usage.requests,
            )
    found: dict[tuple[str, str | None], tuple[int, int, int, int, int]] = {}
    for line in lines:
        key = (line.tenant_id, line.deployment_id)
        if line.kind != USAGE_KIND:
            problems.append(f"{key}: unexpected {line.kind} line")
            continue
        if key in found:
            problems.append(f"{key}: more than one line")
        found[key] = (
            line.amount_cents,
            line.qty,
            int(line.meta["input_tokens"]),
            int(line.meta["output_tokens"]),
            int(line.meta["requests"]),
        )
    for key in sorted(expected.keys() | found.keys(), key=lambda k: (k[0], k[1] or "")):
        want, got = expected.get(key), found.get(key)
        if want != got:
            problems.append(
                f"{key}: raw events say (cents, qty, in, out, requests) = {want}, "
                f"the rollup's line says {got}"
            )
    return problems


def median_seconds(samples: Sequence[float]) -> float:
    return statistics.median(samples)


# ---------------------------------------------------------------------------------------------
# Plumbing beside bench_support's.


async def drop_database(database_url: str, name: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await connection.close()


async def _server_facts(connection: Connection) -> str:
    facts = []
    for setting in (
        "server_version",
        "shared_buffers",
        "work_mem",
        "max_parallel_workers_per_gather",
    ):
        facts.append(f"{setting}={await connection.fetchval(f'SHOW {setting}')}")
    return ", ".join(facts)


# ---------------------------------------------------------------------------------------------
# `bench rollup`


@dataclass(frozen=True)
class SizeResult:
    events: int
    rollup_seconds: list[float]  # each on a connection of its own, as `rollup run` runs
    reused_seconds: list[float]  # again and again on one connection, as `rollup schedule` runs
    raw_seconds: list[float]
    as_loaded_rollup: float
    as_loaded_raw: float
    lines: int
    daily_rows: int
    daily_dead_rows: int
    events_bytes: int
    daily_bytes: int
    load_seconds: float

    @property
    def rollup(self) -> float:
        return median_seconds(self.rollup_seconds)

    @property
    def reused(self) -> float:
        return median_seconds(self.reused_seconds)

    @property
    def raw(self) -> float:
        return median_seconds(self.raw_seconds)


async def run_rollup_benchmark(
    *,
    events: int,
    tenants: int,
    deployments: int,
    sizes: str,
    batch: int,
    repeats: int,
    seed: str,
    keep_database: bool,
) -> None:
    """Load the month size by size; at each size time `rollup run` and the raw GROUP BY."""
    configure_logging(log_format="console", level="WARNING")
    checkpoints = parse_sizes(sizes, events=events)
    settings = await asyncio.to_thread(settings_for_local_run)
    await drop_database(settings.database_url, ROLLUP_DATABASE)  # what an earlier run left
    database_url = await bench_database(settings.database_url, ROLLUP_DATABASE)
    period = previous_period(datetime.now(UTC))
    print(
        f"{events:,} events in {period} over {tenants:,} tenants x {deployments} deployments, "
        f"measured at {', '.join(f'{size:,}' for size in checkpoints)}; loaded in transactions "
        f"of {batch:,} events (COPY + daily pre-aggregate, as the usage consumer writes them); "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    results: list[SizeResult] = []
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
            print(f"PostgreSQL {await _server_facts(connection)}")
        loaded = 0
        for phase, size in enumerate(checkpoints):
            await _check_disk(pool, loaded=loaded, adding=size - loaded)
            rng = random.Random(f"{seed}-{phase}")
            load_seconds = await _load(
                pool,
                month_events(
                    rng,
                    count=size - loaded,
                    period=period,
                    id_prefix=f"rollup-bench-{phase}",
                    tenants=tenants,
                    deployments=deployments,
                ),
                batch=batch,
            )
            print(
                f"\nloaded {size:,} events ({size - loaded:,} new in {load_seconds:.0f} s, "
                f"{(size - loaded) / load_seconds:,.0f} events/s)"
            )
            loaded = size
            results.append(
                await _measure_size(
                    pool,
                    database_url,
                    period=period,
                    events=loaded,
                    repeats=repeats,
                    load_seconds=load_seconds,
                )
            )
    finally:
        await pool.close()
        if not keep_database:
            await drop_database(settings.database_url, ROLLUP_DATABASE)
    _print_rollup_table(results)


async def _check_disk(pool: asyncpg.Pool, *, loaded: int, adding: int) -> None:
    """Refuse to start a load the server's disk cannot hold (events, indexes and WAL)."""
    directory = await pool.fetchval("SHOW data_directory")
    free = await asyncio.to_thread(_free_bytes, directory)
    if free is None:  # a server elsewhere: its operator's business
        return
    size = await pool.fetchval("SELECT pg_database_size(current_database())")
    per_event = size / loaded if loaded else 600  # bytes: table, its 3 indexes, the aggregate
    needed = int(per_event * adding * 1.5) + 2 * 1024**3  # and WAL's headroom
    print(f"disk: {free / 1024**3:.1f} GiB free, about {needed / 1024**3:.1f} GiB needed next")
    if needed > free:
        raise UserFacingError(
            f"loading {adding:,} more events needs about {needed / 1024**3:.1f} GiB but "
            f"{directory} has {free / 1024**3:.1f} GiB free; give a smaller --events/--sizes"
        )


def _free_bytes(directory: str) -> int | None:
    return shutil.disk_usage(directory).free if os.path.isdir(directory) else None


async def _load(pool: asyncpg.Pool, events: Iterator[UsageRow], *, batch: int) -> float:
    """Each batch as the consumer lands one: its rows COPYed and its daily sums added, in one
    transaction."""
    started = time.perf_counter()
    async with pool.acquire() as connection:
        for chunk in batches(events, batch):
            async with connection.transaction():
                await copy_usage_events(connection, chunk)
                await add_to_daily_totals(connection, daily_totals(chunk))
    return time.perf_counter() - started


async def _time_rollup(pool: asyncpg.Pool, period: str) -> tuple[float, list[InvoiceLine]]:
    started = time.perf_counter()
    result = await run_rollup(pool, period=period)
    return time.perf_counter() - started, result.lines


async def _time_rollup_command(database_url: str, period: str) -> tuple[float, list[InvoiceLine]]:
    """`rollup run` as the command runs it: a pool of one new connection (not timed), one run.
    A new connection plans each statement afresh, with its parameters' values."""
    pool = await create_pool(database_url, size=1)
    try:
        return await _time_rollup(pool, period)
    finally:
        await pool.close()


async def _time_rollup_reused(database_url: str, period: str, runs: int) -> list[float]:
    """Runs after the first on one connection, as a long-lived `rollup schedule` makes them:
    asyncpg keeps each statement prepared, and PostgreSQL may switch it to a generic plan
    after five executions."""
    pool = await create_pool(database_url, size=1)
    try:
        await _time_rollup(pool, period)
        return [(await _time_rollup(pool, period))[0] for _ in range(runs)]
    finally:
        await pool.close()


async def _time_raw(pool: asyncpg.Pool, period: str) -> tuple[float, list[GroupUsage]]:
    first_day = parse_period(period)
    start = datetime.combine(first_day, clock_time(), tzinfo=UTC)
    end = datetime.combine(next_month(first_day), clock_time(), tzinfo=UTC)
    started = time.perf_counter()
    rows = await pool.fetch(RAW_MONTH_QUERY, start, end)
    seconds = time.perf_counter() - started
    return seconds, [(row[0], row[1], Usage(*row[2:])) for row in rows]


async def _raw_plan(pool: asyncpg.Pool, period: str) -> str:
    """How PostgreSQL reads the raw query's rows (its scan nodes), for the record."""
    first_day = parse_period(period)
    start = datetime.combine(first_day, clock_time(), tzinfo=UTC)
    end = datetime.combine(next_month(first_day), clock_time(), tzinfo=UTC)
    plan = await pool.fetch(f"EXPLAIN {RAW_MONTH_QUERY}", start, end)
    scans = [row[0].strip().removeprefix("->  ").split("  (")[0] for row in plan]
    return "; ".join(line for line in scans if "Scan" in line or "Aggregate" in line)


async def _measure_size(
    pool: asyncpg.Pool,
    database_url: str,
    *,
    period: str,
    events: int,
    repeats: int,
    load_seconds: float,
) -> SizeResult:
    # As loaded: the aggregate carries the dead row versions of its upserts, the new events are
    # not yet vacuumed (the first scan of them also sets their hint bits).
    dead_rows = await _dead_rows(pool)
    as_loaded_rollup, lines = await _time_rollup_command(database_url, period)
    as_loaded_raw, raw = await _time_raw(pool, period)
    print(
        f"as loaded ({dead_rows:,} dead row versions in usage_daily_totals): "
        f"rollup run {as_loaded_rollup:.3f} s, raw GROUP BY {as_loaded_raw:.2f} s"
    )
    _require_agreement(lines, raw, events=events)
    # Settled: what autovacuum leaves of a month long before it is billed.
    started = time.perf_counter()
    async with pool.acquire() as connection:
        await connection.execute("VACUUM ANALYZE usage_daily_totals")
        await connection.execute("VACUUM ANALYZE llm_usage_events")
    print(f"VACUUM ANALYZE both tables: {time.perf_counter() - started:.0f} s (not timed)")
    rollup_seconds: list[float] = []
    raw_seconds: list[float] = []
    for _ in range(repeats):
        seconds, lines = await _time_rollup_command(database_url, period)
        rollup_seconds.append(seconds)
        seconds, raw = await _time_raw(pool, period)
        raw_seconds.append(seconds)
    _require_agreement(lines, raw, events=events)
    reused_seconds = await _time_rollup_reused(database_url, period, repeats)
    print(f"raw query plan: {await _raw_plan(pool, period)}")
    stored = await pool.fetchval("SELECT count(*) FROM invoice_lines WHERE period = $1", period)
    if stored != len(lines):
        raise AssertionError(f"rollup run returned {len(lines)} lines but stored {stored}")
    print(
        "settled: rollup run "
        + ", ".join(f"{s:.3f}" for s in rollup_seconds)
        + " s; raw GROUP BY "
        + ", ".join(f"{s:.2f}" for s in raw_seconds)
        + f" s; {len(lines):,} lines agree with the raw query; rollup run again on one "
        + "connection "
        + ", ".join(f"{s:.3f}" for s in reused_seconds)
        + " s"
    )
    return SizeResult(
        events=events,
        rollup_seconds=rollup_seconds,
        reused_seconds=reused_seconds,
        raw_seconds=raw_seconds,
        as_loaded_rollup=as_loaded_rollup,
        as_loaded_raw=as_loaded_raw,
        lines=len(lines),
        daily_rows=await pool.fetchval("SELECT count(*) FROM usage_daily_totals"),
        daily_dead_rows=dead_rows,
        events_bytes=await pool.fetchval("SELECT pg_total_relation_size('llm_usage_events')"),
        daily_bytes=await pool.fetchval("SELECT pg_total_relation_size('usage_daily_totals')"),
        load_seconds=load_seconds,
    )


async def _dead_rows(pool: asyncpg.Pool) -> int:
    found = await pool.fetchval(
        "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'usage_daily_totals'"
    )
    return int(found or 0)


def _require_agreement(lines: list[InvoiceLine], raw: list[GroupUsage], *, events: int) -> None:
    problems = disagreements(lines, raw)
    counted = sum(usage.requests for _, _, usage in raw)
    if counted != events:
        problems.insert(0, f"the raw query counts {counted} events, {events} were loaded")
    if problems:
        raise AssertionError(
            f"rollup and raw query disagree ({len(problems)}): " + "; ".join(problems[:5])
        )


def _print_rollup_table(results: list[SizeResult]) -> None:
    print()
    print(
        f"{'events':>12} {'rollup run':>11} {'raw GROUP BY':>13} {'raw/rollup':>11} "
        f"{'reused conn.':>13} {'raw/reused':>11} "
        f"{'as loaded: rollup':>18} {'raw':>7} {'daily rows':>11} {'lines':>6} "
        f"{'events table':>13} {'aggregate':>10}"
    )
    for r in results:
        print(
            f"{r.events:>12,} {r.rollup:>9.3f} s {r.raw:>11.2f} s {r.raw / r.rollup:>10.1f}x "
            f"{r.reused:>11.3f} s {r.raw / r.reused:>10.1f}x "
            f"{r.as_loaded_rollup:>16.3f} s {r.as_loaded_raw:>5.1f} s {r.daily_rows:>11,} "
            f"{r.lines:>6,} {r.events_bytes / 1024**3:>9.2f} GiB "
            f"{r.daily_bytes / 1024**2:>6.0f} MiB"
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        growth = last.events / first.events
        print(
            f"\nfrom {first.events:,} to {last.events:,} events ({growth:.0f}x): rollup run "
            f"{last.rollup / first.rollup:.1f}x (on a reused connection "
            f"{last.reused / first.reused:.1f}x), raw GROUP BY {last.raw / first.raw:.1f}x"
        )
    last = results[-1]
    for name, seconds in (("rollup run", last.rollup), ("on a reused connection", last.reused)):
        print(
            f"goals at {last.events:,} events, {name}: {seconds:.3f} s (< 10 s: "
            f"{'met' if seconds < 10 else 'MISSED'}), {last.raw / seconds:.1f}x faster than the "
            f"raw query (>= 10x: {'met' if last.raw / seconds >= 10 else 'MISSED'})"
        )


# ---------------------------------------------------------------------------------------------
# `bench ingest-aggregate`


@dataclass(frozen=True)
class ConsumerRun:
    keep_daily_totals: bool
    events: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def sample_tenants(tenants: int, deployments: int) -> tuple[SampleTenant, ...]:
    names = tuple(deployment_ids(deployments))
    return tuple(SampleTenant(tenant, names) for tenant in tenant_ids(tenants))


def run_order(rounds: int) -> list[bool]:
    """keep_daily_totals per consumer run: without then with, then with then without, ..."""
    order: list[bool] = []
    for round_ in range(rounds):
        order += [False, True] if round_ % 2 == 0 else [True, False]
    return order


def throughput_drop(without: Sequence[float], with_: Sequence[float]) -> float:
    """How much slower the consumer is with the pre-aggregate: 1 - mean(with) / mean(without)."""
    return 1 - statistics.fmean(with_) / statistics.fmean(without)


async def run_aggregate_cost_benchmark(
    *, events: int, dup_rate: float, tenants: int, deployments: int, rounds: int
) -> None:
    """The same backlog through the real usage consumer with and without the daily
    pre-aggregate, alternating which goes first; print both rates and the drop."""
    configure_logging(log_format="console", level="WARNING")
    settings = await asyncio.to_thread(settings_for_local_run)
    database_url = await bench_database(settings.database_url, AGGREGATE_DATABASE)
    run_id = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    stream = sample_stream(
        random.Random(run_id),
        count=events,
        dup_rate=dup_rate,
        id_prefix=f"bench-{run_id}",
        now=now,
        tenants=sample_tenants(tenants, deployments),
    )
    unique = len({value["gateway_request_id"] for _, _, value in stream})
    print(
        f"{events:,} events ({unique:,} unique, dup rate {dup_rate}) over {tenants:,} tenants x "
        f"{deployments} deployments; {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    bench = settings.model_copy(
        update={
            "database_url": database_url,
            "usage_topic": f"bench-{run_id}.usage",
            "dlq_topic": f"bench-{run_id}.usage.dlq",
            "metrics_port": 0,
        }
    )
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    runs: list[ConsumerRun] = []
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
            print(f"PostgreSQL {await _server_facts(connection)}")
        await ensure_topics(bench, [bench.usage_topic, bench.dlq_topic], partitions=6)
        seconds = await publish_backlog(
            bench, bench.usage_topic, [(key, value) for key, value, _ in stream]
        )
        print(f"published {len(stream):,} events in {seconds:.1f} s (not timed)")
        for number, keep in enumerate(run_order(rounds)):
            run = await _time_recorder(
                bench, pool, keep=keep, group=f"bench-{run_id}-{number}", events=len(stream)
            )
            await _verify_recorded(pool, unique=unique, keep=keep)
            print(
                f"run {number + 1}: pre-aggregate {'on ' if keep else 'off'} "
                f"{run.seconds:6.2f} s {run.rate:>9,.0f} events/s (consumer CPU "
                f"{run.cpu_seconds:.1f} s)"
            )
            runs.append(run)
    finally:
        await pool.close()
    without = [run.rate for run in runs if not run.keep_daily_totals]
    with_ = [run.rate for run in runs if run.keep_daily_totals]
    print(
        f"\nmean without {statistics.fmean(without):,.0f} events/s, with "
        f"{statistics.fmean(with_):,.0f} events/s: drop {throughput_drop(without, with_):.1%} "
        "(goal <= 10 %)"
    )


class _RecorderWithoutDailyTotals(UsageRecorder):
    """The usage consumer's handler minus the daily pre-aggregate: the baseline of its cost
    (`_verify_recorded` finds the aggregate empty after it, or fails)."""

    async def _add_to_daily_totals(self, connection: Connection, stored: list[UsageRow]) -> None:
        return


async def _time_recorder(
    settings: Settings, pool: asyncpg.Pool, *, keep: bool, group: str, events: int
) -> ConsumerRun:
    """The usage consumer as `consume usage` runs it, with the pre-aggregate on or off; a group
    of its own reads the backlog from the start into emptied tables."""
    await pool.execute("TRUNCATE llm_usage_events, usage_event_ids, usage_daily_totals")

    def without_daily_totals(context: ConsumerContext) -> UsageRecorder:
        return _RecorderWithoutDailyTotals(pool=context.pool, clock=context.clock)

    spec = dataclasses.replace(usage_consumer_spec(settings, CollectorRegistry()), group_id=group)
    if not keep:
        spec = dataclasses.replace(spec, make_handler=without_daily_totals)
    freeze_harness_objects()
    run = await time_consumer(settings, spec)
    return ConsumerRun(keep, events, run.seconds, run.cpu_seconds)


async def _verify_recorded(pool: asyncpg.Pool, *, unique: int, keep: bool) -> None:
    """Every unique event stored once; with the pre-aggregate, its sums are the events' exactly."""
    row = await pool.fetchrow(
        "SELECT count(*) AS n, sum(customer_charge_usd) AS usd, sum(input_tokens) AS tokens "
        "FROM llm_usage_events"
    )
    assert row is not None
    if row["n"] != unique:
        raise AssertionError(f"the consumer stored {row['n']} events, expected {unique}")
    totals = await pool.fetchrow(
        "SELECT coalesce(sum(requests), 0) AS n, sum(charge_usd) AS usd, "
        "sum(input_tokens) AS tokens FROM usage_daily_totals"
    )
    assert totals is not None
    expected = (row["n"], row["usd"], row["tokens"]) if keep else (0, None, None)
    if (totals["n"], totals["usd"], totals["tokens"]) != expected:
        raise AssertionError(
            f"usage_daily_totals holds {dict(totals)}, expected {expected} "
            f"(pre-aggregate {'on' if keep else 'off'})"
        )
