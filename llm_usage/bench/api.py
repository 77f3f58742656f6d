"""`llm-usage bench api`: the HTTP API under load, on a database of its own, driven by `wrk`.

1. Load (once; later runs reuse it) sized tenants of exactly 1k, 100k, 1M and 10M events, all in
   last UTC month, and 10M events over 1,000 tenants across this and last month, with every
   aggregate the consumers keep (bench/api_data.py).
2. Start `llm-usage serve api` once per core, all on one port (API_REUSE_PORT: the kernel
   spreads wrk's connections over them).
3. For each sized tenant, one request at a time (`wrk -c1 -t1`) for `seconds` each: last month's
   breakdown (the attributes in turn), summary and daily series: requests/s, p50, p99. Beside
   them, the reports as the release before read them (bench/raw_reports.py: raw events), run
   in this process one at a time on one connection: SQL and asyncpg only, no HTTP, so the old
   figures are, if anything, flattered.
4. `clients` concurrent connections over every route and tenant (summary, breakdown, daily,
   budgets): requests/s, p50, p99.
5. `POST /v1/usage-events` in batches of 1,000 from 4 clients (httpx: each batch must carry new
   ids) against publishing the same events straight to Kafka with the idempotent producer.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from llm_usage.bench.api_data import Months, sized_tenant, spread_tenant
from llm_usage.bench.raw_reports import COLUMNS, raw_report
from llm_usage.bench.wrk import WrkResult, run_wrk, wrk_binary, wrk_version
from llm_usage.testing.processes import spawn_llm_usage

# The benchmark's stack (httpx is a dev dependency) is imported when it runs.
if TYPE_CHECKING:
    import asyncpg
    import httpx

    from llm_usage.core.settings import Settings

BENCH_DATABASE: Final = "llm_usage_bench_api"
SIZED_ROUTES: Final = ("breakdown", "summary", "daily")
DIMENSIONS: Final = tuple(COLUMNS)
AUDIENCE: Final = "llm-usage-pipeline"
INGEST_BATCH: Final = 1000
# Issue 21's goals on this machine: every sized tenant's report one at a time, and the mix.
ONE_AT_A_TIME_P99_MS: Final = 20.0
MIXED_P99_MS: Final = 100.0
# The old reports of a 10M-event tenant take seconds each: at least this many, however long.
MIN_OLD_RUNS: Final = 3


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


@dataclass(frozen=True)
class SizedFigures:
    """One route of one sized tenant: today's over HTTP, the release before's in the DB."""

    events: int
    route: str
    new: WrkResult
    old: Latencies


def _month_query(months: Months) -> str:
    return f"from={months.last.date().isoformat()}&to={months.this.date().isoformat()}"


def route_paths(route: str, tenant: str, months: Months) -> list[str]:
    """The requests of `route` for last month of `tenant` (a breakdown: one per attribute)."""
    base = f"/v1/tenants/{tenant}"
    if route == "summary":
        return [f"{base}/usage/summary?{_month_query(months)}"]
    if route == "breakdown":
        return [
            f"{base}/usage/breakdown?by={by}&limit=10&{_month_query(months)}" for by in DIMENSIONS
        ]
    if route == "daily":
        days = (months.now.date() - months.last.date()).days + 1
        return [f"{base}/usage/daily?days={days}"]
    if route == "budgets":
        return [f"{base}/budgets"]
    raise ValueError(f"no route {route!r}")


def mixed_paths(tenants: Sequence[str], months: Months) -> list[str]:
    """Every tenant's summary, daily, budgets and one breakdown (the attribute by tenant)."""
    paths = []
    for index, tenant in enumerate(tenants):
        paths += route_paths("summary", tenant, months)
        paths += route_paths("daily", tenant, months)
        paths += route_paths("budgets", tenant, months)
        paths.append(route_paths("breakdown", tenant, months)[index % len(DIMENSIONS)])
    return paths


async def start_api_servers(
    settings: Settings, url: str, secret: str, processes: int
) -> tuple[list[asyncio.subprocess.Process], str]:
    """`processes` x `llm-usage serve api` on one port (API_REUSE_PORT), each with a pool of 8,
    tokens signed with `secret` (HS256): the processes and their base URL."""
    environment = {
        **os.environ,
        "DATABASE_URL": url,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "USAGE_TOPIC": settings.usage_topic,
        "API_HOST": "127.0.0.1",
        "API_PORT": "0",
        "API_REUSE_PORT": "true",
        "API_JWT_SECRET": secret,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "DATABASE_POOL_SIZE": "8",
    }
    environment.pop("API_JWT_JWKS_FILE", None)
    started: list[asyncio.subprocess.Process] = []
    try:
        port = await _start_server(environment, started)
        environment["API_PORT"] = str(port)
        for _ in range(processes - 1):
            await _start_server(environment, started)
    except BaseException:
        await stop_processes(started)
        raise
    return started, f"http://127.0.0.1:{port}"


async def _start_server(
    environment: dict[str, str], started: list[asyncio.subprocess.Process]
) -> int:
    process = await spawn_llm_usage("serve", "api", env=environment)
    started.append(process)
    assert process.stderr is not None
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), 60)
        if not line:
            raise SystemExit("`llm-usage serve api` stopped before it listened")
        if line.startswith(b"{") and json.loads(line).get("event") == "API listening.":
            asyncio.get_running_loop().create_task(_drain(process.stderr))
            return int(json.loads(line)["port"])


async def stop_processes(processes: list[asyncio.subprocess.Process]) -> None:
    for process in processes:
        if process.returncode is None:
            process.terminate()
    for process in processes:
        await process.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def _old_route(
    connection: asyncpg.Connection, route: str, tenant: str, months: Months, seconds: float
) -> Latencies:
    latencies = Latencies()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(latencies.seconds) < MIN_OLD_RUNS:
        dimension = DIMENSIONS[len(latencies.seconds) % len(DIMENSIONS)]
        started = time.perf_counter()
        await raw_report(
            connection, route, tenant, start=months.last, end=months.this, dimension=dimension
        )
        latencies.seconds.append(time.perf_counter() - started)
    return latencies


def _events(count: int, now: datetime) -> list[dict[str, Any]]:
    return [
        {
            "gateway_request_id": f"api-bench-{uuid.uuid4().hex}",
            "tenant_id": f"ingest-{n % 50}",
            "deployment_id": f"dep-{n % 5}",
            "model": "model-1",
            "input_tokens": 1200,
            "output_tokens": 300,
            "customer_charge_usd": "0.0054",
            "occurred_at": now.isoformat().replace("+00:00", "Z"),
        }
        for n in range(count)
    ]


async def _ingest(
    client: httpx.AsyncClient, settings: Settings, *, events: int, now: datetime
) -> tuple[float, Latencies, float]:
    batches = [_events(INGEST_BATCH, now) for _ in range(max(events // INGEST_BATCH, 1))]
    latencies = Latencies()
    queue = list(batches)

    async def poster() -> None:
        while queue:
            batch = queue.pop()
            started = time.perf_counter()
            answer = await client.post("/v1/usage-events", json=batch)
            latencies.seconds.append(time.perf_counter() - started)
            statuses = {r["status"] for r in answer.json()["results"]}
            if answer.status_code != 200 or statuses != {"accepted"}:
                raise SystemExit(f"ingest: {answer.status_code} {answer.text[:300]}")

    started = time.perf_counter()
    await asyncio.gather(*(poster() for _ in range(4)))
    api_rate = len(batches) * INGEST_BATCH / (time.perf_counter() - started)
    records = [
        (event["tenant_id"].encode(), json.dumps(event).encode())
        for event in _events(len(batches) * INGEST_BATCH, now)
    ]
    from llm_usage.bench.support import publish_backlog  # noqa: PLC0415

    kafka_seconds = await publish_backlog(settings, settings.usage_topic, records)
    return api_rate, latencies, len(records) / kafka_seconds


async def run_api_benchmark(
    *, sizes: list[int], events: int, tenants: int, clients: int, seconds: float, ingest_events: int
) -> None:
    from llm_usage.local.run import settings_for_local_run  # noqa: PLC0415

    wrk_binary()  # before anything is started or loaded
    await measure_api(
        # In a thread: starting the services runs event loops of its own.
        await asyncio.to_thread(settings_for_local_run),
        database=BENCH_DATABASE,
        sizes=sizes,
        events=events,
        tenants=tenants,
        clients=clients,
        seconds=seconds,
        ingest_events=ingest_events,
    )


async def measure_api(
    settings: Settings,
    *,
    database: str,
    sizes: list[int],
    events: int,
    tenants: int,
    clients: int,
    seconds: float,
    ingest_events: int,
) -> None:
    """The whole benchmark against the services of `settings`, in database `database`."""
    import asyncpg  # noqa: PLC0415 - see the imports above
    import httpx  # noqa: PLC0415
    import jwt  # noqa: PLC0415

    from llm_usage.bench.api_data import load_bench_data  # noqa: PLC0415
    from llm_usage.bench.support import bench_database  # noqa: PLC0415
    from llm_usage.kafka.topics import ensure_topics  # noqa: PLC0415
    from llm_usage.storage.migrate import migrate  # noqa: PLC0415

    wrk = await wrk_version()
    # Ingested events go to a topic of their own: no consumer of the real one stores them.
    settings = settings.model_copy(
        update={"usage_topic": f"llm_usage_recorded.bench-api-{uuid.uuid4().hex[:8]}"}
    )
    await ensure_topics(settings, [settings.usage_topic], partitions=6)
    url = await bench_database(settings.database_url, database)
    now = datetime.now(UTC)
    months = Months.around(now)
    connection = await asyncpg.connect(url)
    try:
        await migrate(connection)
        server_version = await connection.fetchval("SHOW server_version")
        await load_bench_data(connection, sizes=sizes, events=events, tenants=tenants, now=now)
    finally:
        await connection.close()
    secret = secrets.token_hex(32)
    cores = os.cpu_count() or 1
    processes, base = await start_api_servers(settings, url, secret, cores)
    claims = {"aud": AUDIENCE, "exp": int(time.time()) + 86400, "sub": "bench"}
    admin = jwt.encode({**claims, "role": "platform-admin"}, secret, algorithm="HS256")
    headers = [f"Authorization: Bearer {admin}"]
    everyone = [spread_tenant(index) for index in range(tenants if events else 0)]
    everyone += [sized_tenant(size) for size in sizes]
    mix = mixed_paths(everyone, months)
    try:
        sized, mixed = await _reads(
            base, url, headers, months, sizes=sizes, mix=mix, clients=clients, seconds=seconds
        )
        ingest = None
        if ingest_events:
            async with httpx.AsyncClient(
                base_url=base, headers={"Authorization": f"Bearer {admin}"}, timeout=60
            ) as client:
                ingest = await _ingest(client, settings, events=ingest_events, now=now)
    finally:
        await stop_processes(processes)
    print(
        f"\n{sum(sizes) + events:,} events: sized tenants {', '.join(f'{s:,}' for s in sizes)} "
        f"in {months.last:%B %Y}, {events:,} over {tenants} tenants; {wrk}; {cores} API "
        f"processes on {cores} CPUs; PostgreSQL {server_version}; {seconds:.0f} s a measurement\n"
    )
    print(sized_table(sized))
    print(growth_lines(sized))
    print(
        f"\n{clients} connections over every route of {len(everyone):,} tenants "
        f"({len(mix):,} requests): {mixed.per_second:,.0f} requests/s, "
        f"p50 {mixed.p50_ms:.1f} ms, p99 {mixed.p99_ms:.1f} ms ({mixed.requests:,} requests)"
    )
    print(goal_lines(sized, mixed))
    if ingest is not None:
        api_rate, batch_latencies, kafka_rate = ingest
        print(
            f"\ningest: POST /v1/usage-events {api_rate:,.0f} events/s (batches of "
            f"{INGEST_BATCH}, 4 clients; p50 {batch_latencies.percentile(0.5):.0f} ms, "
            f"p99 {batch_latencies.percentile(0.99):.0f} ms per batch) vs the Kafka producer "
            f"straight {kafka_rate:,.0f} events/s"
        )


async def _reads(
    base: str,
    url: str,
    headers: list[str],
    months: Months,
    *,
    sizes: list[int],
    mix: list[str],
    clients: int,
    seconds: float,
) -> tuple[list[SizedFigures], WrkResult]:
    """A warm-up, each sized tenant's reports one at a time (today's over HTTP, the old ones in
    the database), then the mix under `clients` connections."""
    import asyncpg  # noqa: PLC0415 - see the imports above

    cores = os.cpu_count() or 1
    await run_wrk(
        base, mix, connections=clients, threads=cores, seconds=min(seconds, 5), headers=headers
    )
    sized = []
    connection = await asyncpg.connect(url)
    try:
        for size in sizes:
            tenant = sized_tenant(size)
            for route in SIZED_ROUTES:
                paths = route_paths(route, tenant, months)
                new = await run_wrk(
                    base, paths, connections=1, threads=1, seconds=seconds, headers=headers
                )
                old = await _old_route(connection, route, tenant, months, seconds)
                sized.append(SizedFigures(size, route, new, old))
    finally:
        await connection.close()
    mixed = await run_wrk(
        base, mix, connections=clients, threads=cores, seconds=seconds, headers=headers
    )
    return sized, mixed


def sized_table(sized: Sequence[SizedFigures]) -> str:
    lines = [
        "| tenant events | route | requests/s | p50 | p99 | before: p50 | before: p99 | runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for found in sized:
        lines.append(
            f"| {found.events:,} | {found.route} | {found.new.per_second:,.0f} "
            f"| {found.new.p50_ms:.1f} ms | {found.new.p99_ms:.1f} ms "
            f"| {found.old.percentile(0.5):.1f} ms | {found.old.percentile(0.99):.1f} ms "
            f"| {len(found.old.seconds):,} |"
        )
    return "\n".join(lines)


def growth_lines(sized: Sequence[SizedFigures]) -> str:
    """p99 of the largest tenant over the smallest's, per route, today and before."""
    lines = []
    for route in SIZED_ROUTES:
        found = sorted((f for f in sized if f.route == route), key=lambda f: f.events)
        if len(found) < 2:
            continue
        small, large = found[0], found[-1]
        lines.append(
            f"{route}: p99 from {small.events:,} to {large.events:,} events x"
            f"{large.new.p99_ms / small.new.p99_ms:.1f} "
            f"(before: x{large.old.percentile(0.99) / small.old.percentile(0.99):.1f})"
        )
    return "\n" + "\n".join(lines) if lines else ""


def goal_lines(sized: Sequence[SizedFigures], mixed: WrkResult) -> str:
    worst = max(sized, key=lambda found: found.new.p99_ms)
    one = "met" if worst.new.p99_ms < ONE_AT_A_TIME_P99_MS else "NOT met"
    many = "met" if mixed.p99_ms < MIXED_P99_MS else "NOT met"
    return (
        f"\ngoal: one at a time, p99 < {ONE_AT_A_TIME_P99_MS:.0f} ms for every sized tenant and "
        f"route: {one} (worst {worst.new.p99_ms:.1f} ms, {worst.route} of {worst.events:,} "
        f"events)\ngoal: under load, p99 < {MIXED_P99_MS:.0f} ms: {many} ({mixed.p99_ms:.1f} ms)"
    )
