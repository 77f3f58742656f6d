"""`llm-usage bench reconcile`: how long reconcile takes over the events `bench api` loads (its
10M-event spread over this and last month, and its sized tenants when it loaded them), and how
many events a second that is.

1. Load what is missing of bench api's data into `llm_usage_bench_api` (reused when there).
2. Fill every budget counter the events make, in one statement (bench api keeps the tenants'
   counters only), so that a clean reconcile finds nothing; recorded, so it is done once.
3. Reconcile both months without the alerts topic, `--repeats` times: seconds, events/s, drifts
   (0 expected), and the process's peak RSS. The last line is the figures as JSON.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from datetime import UTC, date, datetime
from datetime import time as time_of_day
from typing import TYPE_CHECKING, Final

from llm_usage.bench.api import BENCH_DATABASE
from llm_usage.bench.api_data import Months

if TYPE_CHECKING:
    import asyncpg

    from llm_usage.core.settings import Settings
    from llm_usage.rollup.reconcile import ReconcileReport

_SPEND_FILLED: Final = "reconcile-spend"

# Every counter of every event from the budget horizon on, as the budget consumer keeps them.
_FILL_SPEND = """
    INSERT INTO budget_spend (tenant_id, scope_type, scope_id, "window", period_start, spend_usd)
    SELECT e.tenant_id, s.scope_type, s.scope_id, w."window",
           CASE w."window" WHEN 'daily' THEN (e.occurred_at AT TIME ZONE 'UTC')::date
                ELSE date_trunc('month', e.occurred_at AT TIME ZONE 'UTC')::date END,
           sum(e.customer_charge_usd)
    FROM llm_usage_events AS e
    CROSS JOIN LATERAL (VALUES ('tenant', e.tenant_id), ('deployment', e.deployment_id),
                               ('user', e.user_id), ('agent', e.agent_id))
        AS s(scope_type, scope_id)
    CROSS JOIN (VALUES ('daily'), ('monthly')) AS w("window")
    WHERE s.scope_id IS NOT NULL AND e.occurred_at >= $1
    GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (tenant_id, scope_type, scope_id, "window", period_start)
        DO UPDATE SET spend_usd = EXCLUDED.spend_usd
"""


async def run_reconcile_benchmark(*, events: int, tenants: int, repeats: int) -> None:
    from llm_usage.local.run import settings_for_local_run  # noqa: PLC0415

    await measure_reconcile(
        # In a thread: starting the services runs event loops of its own.
        await asyncio.to_thread(settings_for_local_run),
        database=BENCH_DATABASE,
        events=events,
        tenants=tenants,
        repeats=repeats,
    )


async def measure_reconcile(
    settings: Settings, *, database: str, events: int, tenants: int, repeats: int
) -> list[ReconcileReport]:
    """The whole benchmark against the services of `settings`, in database `database`."""
    import asyncpg  # noqa: PLC0415 - the database stack, when the benchmark runs

    from llm_usage.bench.api_data import load_bench_data  # noqa: PLC0415
    from llm_usage.bench.support import bench_database  # noqa: PLC0415
    from llm_usage.domain.budgets import budget_horizon  # noqa: PLC0415
    from llm_usage.domain.periods import period_of  # noqa: PLC0415
    from llm_usage.rollup.reconcile import COMMAND_READERS, reconcile  # noqa: PLC0415
    from llm_usage.storage.migrate import migrate  # noqa: PLC0415
    from llm_usage.storage.pool import create_pool  # noqa: PLC0415

    now = datetime.now(UTC)
    months = Months.around(now)
    periods = [period_of(months.last.date()), period_of(months.this.date())]
    url = await bench_database(settings.database_url, database)
    connection = await asyncpg.connect(url)
    try:
        await migrate(connection)
        await load_bench_data(connection, sizes=[], events=events, tenants=tenants, now=now)
        await _fill_spend(connection, budget_horizon(now))
    finally:
        await connection.close()
    pool = await create_pool(url, size=COMMAND_READERS)
    reports = []
    try:
        for run in range(1, repeats + 1):
            report = await reconcile(
                pool,
                settings,
                periods=periods,
                confirm_seconds=0,
                read_topic=False,
                now=now,
                readers=COMMAND_READERS,
            )
            reports.append(report)
            print(
                f"run {run}: {report.events:,} events in {report.seconds:,.1f} s "
                f"({report.events_per_second:,.0f} events/s), {len(report.drifts)} drifts"
            )
            for drift in report.drifts[:5]:
                print(f"  {drift.text()}")
    finally:
        await pool.close()
    best = min(reports, key=lambda r: r.seconds)
    peak_mib = _peak_rss_mib()
    print(
        f"reconcile {' and '.join(periods)}: best of {repeats} {best.seconds:,.1f} s for "
        f"{best.events:,} events ({best.events_per_second:,.0f} events/s; goal < 60 s for 10M), "
        f"peak RSS {peak_mib:,.0f} MiB"
    )
    print(
        json.dumps(
            {
                "bench": "reconcile",
                "periods": periods,
                "events": best.events,
                "seconds": [round(r.seconds, 2) for r in reports],
                "events_per_second": round(best.events_per_second),
                "drifts": [len(r.drifts) for r in reports],
                "peak_rss_mib": round(peak_mib),
            }
        )
    )
    return reports


async def _fill_spend(connection: asyncpg.Connection, horizon: date) -> None:
    """Every counter the events make, once per load of bench api's parts (recorded beside them
    with the events they covered; filled again after bench api loaded more)."""
    loaded = await connection.fetchval(
        "SELECT coalesce(sum(events), 0) FROM bench_api_loaded WHERE part <> $1", _SPEND_FILLED
    )
    filled = await connection.fetchval(
        "SELECT events FROM bench_api_loaded WHERE part = $1", _SPEND_FILLED
    )
    if filled == loaded:
        return
    started = time.perf_counter()
    async with connection.transaction():
        await connection.execute(_FILL_SPEND, datetime.combine(horizon, time_of_day(0), UTC))
        await connection.execute(
            "INSERT INTO bench_api_loaded (part, events, tenants) VALUES ($1, $2, 0) "
            "ON CONFLICT (part) DO UPDATE SET events = EXCLUDED.events, loaded_at = now()",
            _SPEND_FILLED,
            loaded,
        )
    print(f"budget counters filled from the events in {time.perf_counter() - started:,.0f} s")


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
