"""`llm-usage bench api`: the HTTP API under load, on a database of its own.

1. Load (once; later runs reuse it) `events` usage events over `tenants` tenants in this and
   last UTC month, straight into PostgreSQL with `generate_series` (the read path is what is
   measured, not ingestion), with the daily pre-aggregate, a tenant policy and its spend
   counters as the consumers would have left them. Three tenants of this month have exactly
   1,000, 100,000 and 1,000,000 events, for how latency grows with a tenant's size.
2. Start `llm-usage serve api` as its own process and let `clients` concurrent clients call
   summary, breakdown (a random attribute), daily and budgets of random tenants for `seconds`:
   requests/s, p50 and p99 per route and overall.
3. A month's breakdown of the 1k, 100k and 1M tenants, one request at a time: p50 and p99.
4. `POST /v1/usage-events` in batches of 1,000 from 4 clients against publishing the same events
   straight to Kafka with the idempotent producer: events/s, and p99 per batch for the API.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from llm_usage.testing.processes import spawn_llm_usage

# The benchmark's stack (httpx is a dev dependency) is imported when it runs.
if TYPE_CHECKING:
    import httpx

    from llm_usage.core.settings import Settings

BENCH_DATABASE: Final = "llm_usage_bench_api"
SIZED_TENANTS: Final = {"sized-1k": 1_000, "sized-100k": 100_000, "sized-1m": 1_000_000}
ROUTES: Final = ("summary", "breakdown", "daily", "budgets")
DIMENSIONS: Final = ("deployment", "model", "provider", "user", "agent", "channel", "feature")
AUDIENCE: Final = "llm-usage-pipeline"
INGEST_BATCH: Final = 1000

# One statement per chunk of generated events; `$1` first number, `$2` count, `$3` tenants,
# `$4` first instant, `$5` seconds covered. Attribute cardinalities are a portal's: a few
# deployments and providers, a dozen models, hundreds of users.
_LOAD = """
    INSERT INTO llm_usage_events (
        gateway_request_id, tenant_id, deployment_id, user_id, agent_id, channel, feature,
        provider, model, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens,
        total_tokens, customer_charge_usd, customer_charge_cents, occurred_at, received_at)
    SELECT 'bench-' || g, {tenant}, 'dep-' || (g % 5), 'user-' || (g % 397), 'agent-' || (g % 17),
           (ARRAY['web', 'api', 'slack'])[1 + g % 3], 'feature-' || (g % 7),
           (ARRAY['openai', 'anthropic', 'google'])[1 + g % 3], 'model-' || (g % 12),
           1 + g % 4000, 1 + g % 900, g % 200, g % 100, 2 + g % 4000 + g % 900,
           ((g * 7919) % 100000)::numeric / 1000000, 0,
           $4::timestamptz + ((g * 104729) % $5) * interval '1 second', now()
    FROM generate_series($1::bigint, $1::bigint + $2 - 1) AS g
"""
_SPREAD_TENANT = "'tenant-' || lpad((g % $3)::text, 4, '0')"
_DAILY_TOTALS = """
    INSERT INTO usage_daily_totals
        (tenant_id, deployment_id, day, charge_usd, input_tokens, output_tokens, requests)
    SELECT tenant_id, deployment_id, (occurred_at AT TIME ZONE 'UTC')::date,
           sum(customer_charge_usd), sum(input_tokens), sum(output_tokens), count(*)
    FROM llm_usage_events
    GROUP BY tenant_id, deployment_id, (occurred_at AT TIME ZONE 'UTC')::date
"""
_POLICIES = """
    INSERT INTO budget_policies (tenant_id, scope_type, scope_id, daily_limit_usd,
                                 monthly_limit_usd, warn_threshold_pct)
    SELECT DISTINCT tenant_id, 'tenant', tenant_id, 50, 1000, 80 FROM usage_daily_totals
"""
_SPEND = """
    INSERT INTO budget_spend (tenant_id, scope_type, scope_id, "window", period_start, spend_usd)
    SELECT tenant_id, 'tenant', tenant_id, 'daily', day, sum(charge_usd)
    FROM usage_daily_totals GROUP BY tenant_id, day
    UNION ALL
    SELECT tenant_id, 'tenant', tenant_id, 'monthly', date_trunc('month', day)::date,
           sum(charge_usd)
    FROM usage_daily_totals GROUP BY tenant_id, date_trunc('month', day)
"""


@dataclass
class Latencies:
    seconds: list[float]

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


def _month_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


async def _load(url: str, *, events: int, tenants: int, now: datetime) -> None:
    import asyncpg  # noqa: PLC0415 - see the imports above

    connection = await asyncpg.connect(url)
    try:
        stored = await connection.fetchval("SELECT count(*) FROM llm_usage_events")
        wanted = events + sum(SIZED_TENANTS.values())
        if stored == wanted:
            print(f"reusing the {stored:,} events already loaded in {BENCH_DATABASE}")
            return
        if stored:
            raise SystemExit(
                f"{BENCH_DATABASE} holds {stored:,} events, not {wanted:,}: drop it "
                f"(DROP DATABASE {BENCH_DATABASE}) to load again"
            )
        started = time.perf_counter()
        month = _month_start(now)
        last_month = _month_start(month - timedelta(days=1))
        span = int((now - last_month).total_seconds()) - 60
        chunk = 500_000
        for first in range(0, events, chunk):
            count = min(chunk, events - first)
            await connection.execute(
                _LOAD.format(tenant=_SPREAD_TENANT), first, count, tenants, last_month, span
            )
            print(f"  {first + count:,} / {events:,} events", end="\r", flush=True)
        first = events
        for tenant, count in SIZED_TENANTS.items():
            this_month = max(int((now - month).total_seconds()) - 60, 1)
            await connection.execute(
                _LOAD.format(tenant="$3::text"), first, count, tenant, month, this_month
            )
            first += count
        print(f"\nloaded {wanted:,} events in {time.perf_counter() - started:.0f} s; aggregating")
        await connection.execute(_DAILY_TOTALS)
        await connection.execute(_POLICIES)
        await connection.execute(_SPEND)
        await connection.execute("VACUUM ANALYZE")
        print(f"ready after {time.perf_counter() - started:.0f} s")
    finally:
        await connection.close()


async def _start_server(
    settings: Settings, url: str, secret: str
) -> tuple[asyncio.subprocess.Process, str]:
    environment = {
        **os.environ,
        "DATABASE_URL": url,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "USAGE_TOPIC": settings.usage_topic,
        "API_HOST": "127.0.0.1",
        "API_PORT": "0",
        "API_JWT_SECRET": secret,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "DATABASE_POOL_SIZE": "8",
    }
    environment.pop("API_JWT_JWKS_FILE", None)
    process = await spawn_llm_usage("serve", "api", env=environment)
    assert process.stderr is not None
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), 60)
        if not line:
            raise SystemExit("`llm-usage serve api` stopped before it listened")
        if line.startswith(b"{") and json.loads(line).get("event") == "API listening.":
            port = json.loads(line)["port"]
            asyncio.get_running_loop().create_task(_drain(process.stderr))
            return process, f"http://127.0.0.1:{port}"


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


def _request(route: str, tenant: str, rng: random.Random) -> tuple[str, dict[str, str]]:
    base = f"/v1/tenants/{tenant}"
    if route == "summary":
        return f"{base}/usage/summary", {}
    if route == "breakdown":
        return f"{base}/usage/breakdown", {"by": rng.choice(DIMENSIONS), "limit": "10"}
    if route == "daily":
        return f"{base}/usage/daily", {"days": "30"}
    return f"{base}/budgets", {}


async def _mixed_load(
    client: httpx.AsyncClient, *, clients: int, seconds: float, tenants: int
) -> tuple[dict[str, Latencies], float]:
    by_route: dict[str, Latencies] = defaultdict(lambda: Latencies([]))
    deadline = time.perf_counter() + seconds
    errors = 0

    async def one_client(seed: int) -> None:
        nonlocal errors
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            route = rng.choice(ROUTES)
            path, params = _request(route, f"tenant-{rng.randrange(tenants):04d}", rng)
            started = time.perf_counter()
            answer = await client.get(path, params=params)
            by_route[route].seconds.append(time.perf_counter() - started)
            if answer.status_code != 200:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(one_client(seed) for seed in range(clients)))
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{errors} requests did not answer 200")
    return by_route, elapsed


async def _sized(client: httpx.AsyncClient, repeats: int = 20) -> dict[str, Latencies]:
    found = {}
    for tenant in SIZED_TENANTS:
        latencies = Latencies([])
        for index in range(repeats):
            started = time.perf_counter()
            answer = await client.get(
                f"/v1/tenants/{tenant}/usage/breakdown",
                params={"by": DIMENSIONS[index % len(DIMENSIONS)]},
            )
            latencies.seconds.append(time.perf_counter() - started)
            if answer.status_code != 200:
                raise SystemExit(f"{tenant}: {answer.status_code} {answer.text}")
        found[tenant] = latencies
    return found


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
    latencies = Latencies([])
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


def _row(name: str, latencies: Latencies, rate: str = "") -> str:
    return (
        f"| {name} | {len(latencies.seconds):,} | {rate} | {latencies.percentile(0.5):.1f} ms "
        f"| {latencies.percentile(0.99):.1f} ms |"
    )


async def run_api_benchmark(
    *, events: int, tenants: int, clients: int, seconds: float, ingest_events: int
) -> None:
    import asyncpg  # noqa: PLC0415 - see the imports above
    import httpx  # noqa: PLC0415
    import jwt  # noqa: PLC0415

    from llm_usage.bench.support import bench_database  # noqa: PLC0415
    from llm_usage.kafka.topics import ensure_topics  # noqa: PLC0415
    from llm_usage.local.run import settings_for_local_run  # noqa: PLC0415
    from llm_usage.storage.migrate import migrate  # noqa: PLC0415

    # Ingested events go to a topic of their own: no consumer of the real one stores them.
    settings = settings_for_local_run().model_copy(
        update={"usage_topic": f"llm_usage_recorded.bench-api-{uuid.uuid4().hex[:8]}"}
    )
    await ensure_topics(settings, [settings.usage_topic], partitions=6)
    url = await bench_database(settings.database_url, BENCH_DATABASE)
    connection = await asyncpg.connect(url)
    try:
        await migrate(connection)
        server_version = await connection.fetchval("SHOW server_version")
    finally:
        await connection.close()
    now = datetime.now(UTC)
    await _load(url, events=events, tenants=tenants, now=now)
    secret = secrets.token_hex(32)
    process, base = await _start_server(settings, url, secret)
    admin = jwt.encode(
        {"aud": AUDIENCE, "exp": int(time.time()) + 3600, "sub": "bench", "role": "platform-admin"},
        secret,
        algorithm="HS256",
    )
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    try:
        async with httpx.AsyncClient(
            base_url=base,
            headers={"Authorization": f"Bearer {admin}"},
            timeout=60,
            limits=limits,
        ) as client:
            await _mixed_load(client, clients=clients, seconds=min(seconds, 5), tenants=tenants)
            by_route, elapsed = await _mixed_load(
                client, clients=clients, seconds=seconds, tenants=tenants
            )
            sized = await _sized(client)
            api_rate, batch_latencies, kafka_rate = await _ingest(
                client, settings, events=ingest_events, now=now
            )
    finally:
        process.terminate()
        await process.wait()
    _report(
        by_route,
        elapsed,
        sized,
        api_rate,
        batch_latencies,
        kafka_rate,
        header=(
            f"{events + sum(SIZED_TENANTS.values()):,} events over {tenants} tenants (+3 sized), "
            f"{clients} clients for {seconds:.0f} s; PostgreSQL {server_version}, "
            f"{os.cpu_count()} CPUs"
        ),
    )


def _report(  # noqa: PLR0917 - one call, every figure of the run
    by_route: dict[str, Latencies],
    elapsed: float,
    sized: dict[str, Latencies],
    api_rate: float,
    batch_latencies: Latencies,
    kafka_rate: float,
    *,
    header: str,
) -> None:
    everything = Latencies([s for found in by_route.values() for s in found.seconds])
    print(f"\n{header}\n")
    print("| route | requests | requests/s | p50 | p99 |\n| --- | --- | --- | --- | --- |")
    for route in ROUTES:
        found = by_route[route]
        print(_row(route, found, f"{len(found.seconds) / elapsed:,.0f}"))
    print(_row("all", everything, f"{len(everything.seconds) / elapsed:,.0f}"))
    print("\nA month's breakdown, one request at a time, by the tenant's events this month:\n")
    print("| tenant events | requests | | p50 | p99 |\n| --- | --- | --- | --- | --- |")
    for tenant, count in SIZED_TENANTS.items():
        print(_row(f"{count:,}", sized[tenant]))
    print(
        f"\ningest: POST /v1/usage-events {api_rate:,.0f} events/s (batches of {INGEST_BATCH}, "
        f"4 clients; p50 {batch_latencies.percentile(0.5):.0f} ms, "
        f"p99 {batch_latencies.percentile(0.99):.0f} ms per batch) vs the Kafka producer "
        f"straight {kafka_rate:,.0f} events/s"
    )
    overall_p99 = everything.percentile(0.99)
    print(
        f"\ngoal: p99 < 100 ms for a 100k-event tenant's month breakdown: "
        f"{sized['sized-100k'].percentile(0.99):.0f} ms; mixed p99 {overall_p99:.0f} ms"
    )
