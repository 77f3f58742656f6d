"""The events `bench api` reads: sized tenants whose events all fall in last UTC month, and many
events spread over many tenants across this and last month, written straight into PostgreSQL
with `generate_series` (the read path is measured, not ingestion), then the aggregates the
consumers would have kept. Each part is loaded once and recorded, so later runs reuse it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import asyncpg

# Events per generated INSERT: each commits on its own, so a long load shows progress and never
# holds one huge transaction.
CHUNK: Final = 500_000
SIZE_SUFFIXES: Final = {"k": 1_000, "m": 1_000_000}

# One statement per chunk: `$1` first number, `$2` count, `$3` tenants (or the tenant), `$4`
# first instant, `$5` seconds covered, `$6` the id prefix. Attribute cardinalities are a
# portal's: a few deployments and providers, a dozen models, hundreds of users.
_LOAD = """
    INSERT INTO llm_usage_events (
        gateway_request_id, tenant_id, deployment_id, user_id, agent_id, channel, feature,
        provider, model, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens,
        total_tokens, customer_charge_usd, customer_charge_cents, occurred_at, received_at)
    SELECT $6 || g, {tenant}, 'dep-' || (g % 5), 'user-' || (g % 397), 'agent-' || (g % 17),
           (ARRAY['web', 'api', 'slack'])[1 + g % 3], 'feature-' || (g % 7),
           (ARRAY['openai', 'anthropic', 'google'])[1 + g % 3], 'model-' || (g % 12),
           1 + g % 4000, 1 + g % 900, g % 200, g % 100, 2 + g % 4000 + g % 900,
           ((g * 7919) % 100000)::numeric / 1000000, 0,
           $4::timestamptz + ((g * 104729) % $5) * interval '1 second', now()
    FROM generate_series($1::bigint, $1::bigint + $2 - 1) AS g
"""
_SPREAD_TENANT = "'tenant-' || lpad((g % $3)::text, 4, '0')"
_ONE_TENANT = "$3::text"
_LOADED = """
    CREATE TABLE IF NOT EXISTS bench_api_loaded (
        part text PRIMARY KEY, events bigint NOT NULL, tenants int NOT NULL,
        loaded_at timestamptz NOT NULL DEFAULT now())
"""
_DAILY_TOTALS = """
    INSERT INTO usage_daily_totals
        (tenant_id, deployment_id, day, charge_usd, input_tokens, output_tokens, requests)
    SELECT tenant_id, deployment_id, (occurred_at AT TIME ZONE 'UTC')::date,
           sum(customer_charge_usd), sum(input_tokens), sum(output_tokens), count(*)
    FROM llm_usage_events WHERE tenant_id = ANY($1::text[])
    GROUP BY tenant_id, deployment_id, (occurred_at AT TIME ZONE 'UTC')::date
"""
_POLICIES = """
    INSERT INTO budget_policies (tenant_id, scope_type, scope_id, daily_limit_usd,
                                 monthly_limit_usd, warn_threshold_pct)
    SELECT tenant, 'tenant', tenant, 50, 1000, 80 FROM unnest($1::text[]) AS tenant
"""
_SPEND = """
    INSERT INTO budget_spend (tenant_id, scope_type, scope_id, "window", period_start, spend_usd)
    SELECT tenant_id, 'tenant', tenant_id, 'daily', day, sum(charge_usd)
    FROM usage_daily_totals WHERE tenant_id = ANY($1::text[]) GROUP BY tenant_id, day
    UNION ALL
    SELECT tenant_id, 'tenant', tenant_id, 'monthly', date_trunc('month', day)::date,
           sum(charge_usd)
    FROM usage_daily_totals WHERE tenant_id = ANY($1::text[])
    GROUP BY tenant_id, date_trunc('month', day)
"""


def event_count(text: str) -> int:
    """`1000`, `1k`, `100k`, `1m`, `10m` as a number of events."""
    lowered = text.strip().lower()
    factor = SIZE_SUFFIXES.get(lowered[-1:], 1)
    digits = lowered[:-1] if lowered[-1:] in SIZE_SUFFIXES else lowered
    if not digits.isdigit() or int(digits) * factor < 1:
        raise ValueError(f"not a number of events: {text!r} (e.g. 1000, 100k, 10m)")
    return int(digits) * factor


def event_counts(text: str) -> list[int]:
    """`1k,100k,1m,10m` as event counts, each once, smallest first."""
    counts = sorted({event_count(part) for part in text.split(",") if part.strip()})
    if not counts:
        raise ValueError("name at least one size, e.g. 1k,100k")
    return counts


def size_label(events: int) -> str:
    for suffix, factor in sorted(SIZE_SUFFIXES.items(), key=lambda item: -item[1]):
        if events % factor == 0:
            return f"{events // factor}{suffix}"
    return str(events)


def sized_tenant(events: int) -> str:
    return f"sized-{size_label(events)}"


def spread_tenant(index: int) -> str:
    return f"tenant-{index:04d}"


@dataclass(frozen=True)
class Months:
    """Last UTC month (the sized tenants' whole month) and this one up to `now`."""

    last: datetime
    this: datetime
    now: datetime

    @classmethod
    def around(cls, now: datetime) -> Months:
        this = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        last = (this - timedelta(days=1)).replace(day=1)
        return cls(last=last, this=this, now=now)


async def load_bench_data(
    connection: asyncpg.Connection, *, sizes: list[int], events: int, tenants: int, now: datetime
) -> None:
    """Load what is missing of the sized tenants and the spread, then fill its aggregates."""
    await connection.execute(_LOADED)
    months = Months.around(now)
    loaded = {
        row["part"]: (row["events"], row["tenants"])
        for row in await connection.fetch("SELECT part, events, tenants FROM bench_api_loaded")
    }
    if not loaded and await connection.fetchval("SELECT EXISTS (SELECT FROM llm_usage_events)"):
        raise SystemExit(
            "the bench database holds events of an older `bench api` (no record of what it "
            "loaded): drop it to load again"
        )
    if "spread" in loaded and loaded["spread"] != (events, tenants):
        stored_events, stored_tenants = loaded["spread"]
        raise SystemExit(
            f"the bench database holds {stored_events:,} events over {stored_tenants} tenants, "
            f"not {events:,} over {tenants}: pass those or drop the database to load again"
        )
    started = time.perf_counter()
    missing = [size for size in sizes if sized_tenant(size) not in loaded]
    for size in missing:
        seconds = int((months.this - months.last).total_seconds())
        tenant = sized_tenant(size)
        await _load_part(
            connection, tenant, [tenant], _ONE_TENANT, size, tenant, months.last, seconds
        )
    spread = "spread" not in loaded and events > 0
    if spread:
        seconds = max(int((months.now - months.last).total_seconds()) - 60, 1)
        names = [spread_tenant(index) for index in range(tenants)]
        await _load_part(
            connection, "spread", names, _SPREAD_TENANT, events, tenants, months.last, seconds
        )
    if missing or spread:
        await connection.execute("VACUUM ANALYZE")
        print(f"loaded and aggregated in {time.perf_counter() - started:,.0f} s")
    else:
        print("reusing the events loaded before")


async def _load_part(  # noqa: PLR0917 - one call per part, each argument a statement parameter
    connection: asyncpg.Connection,
    part: str,
    tenant_ids: list[str],
    tenant_sql: str,
    events: int,
    tenant_argument: str | int,
    first_instant: datetime,
    seconds: int,
) -> None:
    from llm_usage.storage.usage_dimensions import fill_from_events  # noqa: PLC0415

    started = time.perf_counter()
    statement = _LOAD.format(tenant=tenant_sql)
    for first in range(0, events, CHUNK):
        count = min(CHUNK, events - first)
        await connection.execute(
            statement, first, count, tenant_argument, first_instant, seconds, f"bench-{part}-"
        )
        print(f"  {part}: {first + count:,} / {events:,} events", end="\r", flush=True)
    loaded = time.perf_counter() - started
    async with connection.transaction():
        await connection.execute(_DAILY_TOTALS, tenant_ids)
        await fill_from_events(connection, tenant_ids=tenant_ids)
        await connection.execute(_POLICIES, tenant_ids)
        await connection.execute(_SPEND, tenant_ids)
        await connection.execute(
            "INSERT INTO bench_api_loaded (part, events, tenants) VALUES ($1, $2, $3)",
            part,
            events,
            len(tenant_ids),
        )
    print(
        f"  {part}: {events:,} events loaded in {loaded:,.0f} s, "
        f"aggregated in {time.perf_counter() - started - loaded:,.0f} s"
    )
