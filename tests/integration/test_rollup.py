"""The rollup against a real PostgreSQL: lines from the pre-aggregate the usage consumer keeps,
idempotent runs, closed months frozen by the database, late events billed as true-ups."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from asyncpg.pool import PoolConnectionProxy
from prometheus_client import CollectorRegistry

from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.core.settings import Settings
from llm_usage.domain.money import usd_to_cents
from llm_usage.domain.periods import next_month, parse_period
from llm_usage.rollup.lines import usage_lines
from llm_usage.rollup.run import (
    TENANTS_PER_STEP,
    PeriodNotClosableError,
    close_month,
    run_rollup,
)
from llm_usage.rollup.schedule import RollupScheduler, ScheduleMetrics
from llm_usage.runtime.probes import HealthState
from llm_usage.storage.invoice_lines import monthly_usage
from llm_usage.testing.processes import free_port
from tests import clock
from tests.integration.pipeline import encode, unique, usage_event
from tests.records import consumer_record

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def _with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` (works for host:port and unix-socket URLs)."""
    scheme, _, rest = url.partition("://")
    authority, _, tail = rest.partition("/")
    _, query_mark, query = tail.partition("?")
    return f"{scheme}://{authority}/{name}" + (f"?{query}" if query_mark else "")


async def store(pool: asyncpg.Pool, events: Sequence[dict[str, Any]]) -> None:
    """Through the usage consumer's own handler: the real path that keeps the aggregate."""
    records = [consumer_record(encode(e), offset=n) for n, e in enumerate(events)]
    await UsageRecorder(pool=pool, clock=clock.now).record_batch(records)


def event(tenant: str, day: str, charge: str, deployment: str | None = "dep-1") -> dict[str, Any]:
    return usage_event(
        tenant,
        deployment_id=deployment,
        customer_charge_usd=charge,
        occurred_at=f"{day}T12:00:00Z",
        input_tokens=100,
        output_tokens=10,
    )


async def test_a_month_s_lines_are_exact_and_a_second_run_is_the_same(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = rollup_db
    tenant = unique("tenant")
    # 0.0025 + 0.0025 = 0.005: half a cent only when summed exactly.
    events = [
        event(tenant, "2026-10-03", "0.0025"),
        event(tenant, "2026-10-30", "0.0025"),
        event(tenant, "2026-10-05", "1.00", deployment=None),
        event(tenant, "2026-10-06", "0.001", deployment="dep-tiny"),  # rounds to 0: left out
        event(tenant, "2026-09-30", "5"),  # another month
    ]
    await store(pool, events)
    first = await run_rollup(pool, period="2026-10", tenant_id=tenant)
    again = await run_rollup(pool, period="2026-10", tenant_id=tenant)
    assert first.lines == again.lines
    assert [(line.deployment_id, line.amount_cents, line.qty) for line in first.lines] == [
        (None, 100, 110),
        ("dep-1", 1, 220),
    ]
    stored = await pool.fetchval(
        "SELECT count(*) FROM invoice_lines WHERE tenant_id = $1 AND period = '2026-10'", tenant
    )
    assert stored == 2, "a second run replaces, never copies"
    assert first.lines[1].description == "LLM tokens \u2014 200 in / 20 out (2 requests)"


async def test_closed_months_are_final_in_the_database_itself(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = rollup_db
    tenant = unique("tenant")
    await store(pool, [event(tenant, "2026-10-03", "2.50")])
    with pytest.raises(PeriodNotClosableError, match="2026-11 has not ended yet"):
        await close_month(pool, period="2026-11", now=NOW)
    closed = await close_month(pool, period="2026-10", now=NOW)
    assert closed.closed
    assert [line.amount_cents for line in closed.lines] == [250]
    again = await close_month(pool, period="2026-10", now=NOW)  # harmless
    assert again.lines == closed.lines
    frozen = await run_rollup(pool, period="2026-10")
    assert frozen.closed
    assert [line.as_json() for line in frozen.lines] == [line.as_json() for line in closed.lines]

    for statement in (
        "UPDATE invoice_lines SET amount_cents = 1 WHERE period = '2026-10'",
        "DELETE FROM invoice_lines WHERE period = '2026-10'",
        "INSERT INTO invoice_lines (tenant_id, period, kind, resource_kind, unit, qty, "
        "amount_cents, description, meta, original_period) VALUES ('x', '2026-10', "
        "'llm_usage', 'llm_tokens', 'token', 1, 1, 'd', '{}', '2026-10')",
        "TRUNCATE invoice_lines",
        "DELETE FROM invoice_periods WHERE period = '2026-10'",
    ):
        with pytest.raises(asyncpg.exceptions.RestrictViolationError):
            await pool.execute(statement)


async def test_months_close_in_order(rollup_db: tuple[str, asyncpg.Pool]) -> None:
    _, pool = rollup_db
    tenant = unique("tenant")
    await store(pool, [event(tenant, "2026-08-03", "1"), event(tenant, "2026-10-03", "1")])
    # September has no usage, but late August events would be billed in it: it closes too.
    with pytest.raises(PeriodNotClosableError, match="2026-08 is still open"):
        await close_month(pool, period="2026-10", now=NOW)
    await close_month(pool, period="2026-08", now=NOW)
    with pytest.raises(PeriodNotClosableError, match="2026-09 is still open"):
        await close_month(pool, period="2026-10", now=NOW)
    await close_month(pool, period="2026-09", now=NOW)
    assert (await close_month(pool, period="2026-10", now=NOW)).closed


async def test_late_events_are_trued_up_so_every_month_bills_its_exact_total_once(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = rollup_db
    rng = random.Random(11)
    tenants = [unique("tenant") for _ in range(3)]
    deployments: list[str | None] = ["dep-a", "dep-b", None]
    stored: list[dict[str, Any]] = []

    async def add(month: str, count: int) -> None:
        batch = [
            event(
                rng.choice(tenants),
                f"{month}-{rng.randint(1, 28):02d}",
                f"0.{rng.randint(0, 99999):05d}",
                deployment=rng.choice(deployments),
            )
            for _ in range(count)
        ]
        await store(pool, batch)
        stored.extend(batch)

    await add("2026-07", 60)
    await close_month(pool, period="2026-07", now=NOW)
    for round_, month in enumerate(["2026-08", "2026-09", "2026-10"]):
        await add(month, 40)
        await add("2026-07", 5 + round_)  # late for a closed month
        if round_:
            await add("2026-08", 7)  # late for the month closed last round
        await close_month(pool, period=month, now=NOW)
    await add("2026-09", 9)  # late again, billed in the open November
    await add("2026-07", 3)
    await run_rollup(pool, period="2026-11")

    lines = await pool.fetch(
        "SELECT tenant_id, deployment_id, amount_cents, original_period, kind FROM invoice_lines"
    )
    billed: dict[tuple[str, str | None, str], int] = defaultdict(int)
    for line in lines:
        billed[(line["tenant_id"], line["deployment_id"], line["original_period"])] += line[
            "amount_cents"
        ]
    exact: dict[tuple[str, str | None, str], Decimal] = defaultdict(Decimal)
    for e in stored:
        exact[(e["tenant_id"], e["deployment_id"], e["occurred_at"][:7])] += Decimal(
            e["customer_charge_usd"]
        )
    expected = {key: usd_to_cents(total) for key, total in exact.items()}
    assert {k: v for k, v in billed.items() if v} == {k: v for k, v in expected.items() if v}
    adjustments = [line for line in lines if line["kind"] == "llm_usage_adjustment"]
    assert adjustments, "the late events produced no true-up at all"
    assert {line["original_period"] for line in adjustments} <= {"2026-07", "2026-08", "2026-09"}


async def test_the_aggregate_equals_the_raw_events_after_duplicates_and_racing_replicas(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = rollup_db
    tenant = unique("tenant")
    events = [event(tenant, f"2026-10-{n % 28 + 1:02d}", f"0.{n:04d}") for n in range(1, 600)]
    halves = [events[:400], events[200:]]  # overlapping: duplicates across "replicas"
    await asyncio.gather(*(store(pool, half) for half in halves))
    await store(pool, events[::7])  # redelivered
    raw = await pool.fetch(
        "SELECT deployment_id, (occurred_at AT TIME ZONE 'UTC')::date AS day, "
        "sum(customer_charge_usd) AS charge, sum(input_tokens) AS input_tokens, "
        "sum(output_tokens) AS output_tokens, count(*) AS requests "
        "FROM llm_usage_events WHERE tenant_id = $1 GROUP BY 1, 2 ORDER BY 1, 2",
        tenant,
    )
    aggregate = await pool.fetch(
        "SELECT deployment_id, day, charge_usd AS charge, input_tokens, output_tokens, requests "
        "FROM usage_daily_totals WHERE tenant_id = $1 ORDER BY 1, 2",
        tenant,
    )
    assert [tuple(r) for r in aggregate] == [tuple(r) for r in raw]
    assert sum(r["requests"] for r in aggregate) == len(events)


async def test_rollup_commands_print_json_and_refuse_in_one_line(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    url, pool = rollup_db
    tenant = unique("tenant")
    await store(pool, [event(tenant, "2026-10-03", "0.125", deployment=None)])
    env = {"DATABASE_URL": url, "LOG_FORMAT": "json"}
    printed = _cli(env, "rollup", "run", "--period", "2026-10", "--tenant", tenant, "--json")
    assert printed.returncode == 0, printed.stderr
    [line] = [json.loads(text) for text in printed.stdout.splitlines()]
    assert line == {
        "tenant_id": tenant,
        "period": "2026-10",
        "deployment_id": None,
        "kind": "llm_usage",
        "resource_kind": "llm_tokens",
        "unit": "token",
        "unit_price_cents": None,
        "qty": 110,
        "amount_cents": 13,
        "description": "LLM tokens \u2014 100 in / 10 out (1 requests)",
        "meta": {"input_tokens": 100, "output_tokens": 10, "requests": 1},
        "closed": False,
    }
    for args, expected in (
        (("rollup", "close", "--period", f"{clock.this_month():%Y-%m}"), "has not ended yet"),
        (("rollup", "run", "--period", "2026-13"), "--period"),
    ):
        refused = _cli(env, *args)
        assert refused.returncode == 2
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert expected in refused.stderr


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_usage", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_schedule_closes_a_month_only_after_its_grace(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    url, pool = rollup_db
    tenant = unique("tenant")
    await store(pool, [event(tenant, "2026-10-30", "1"), event(tenant, "2026-11-02", "2")])
    clock = [datetime(2026, 10, 31, 23, 0, tzinfo=UTC)]
    settings = Settings(
        database_url=url,
        rollup_close_grace_hours=48,
        rollup_preview_minutes=15,
        reconcile_interval_minutes=0,  # tests/unit/test_rollup_schedule.py has its cadence
    )
    scheduler = RollupScheduler(
        settings=settings,
        pool=pool,
        metrics=ScheduleMetrics.create(CollectorRegistry()),
        health=HealthState(),
        clock=lambda: clock[0],
    )

    async def closed() -> set[str]:
        return {row["period"] for row in await pool.fetch("SELECT period FROM invoice_periods")}

    await scheduler.tick()  # October is still the current month: a preview of it
    assert await closed() == set()
    assert await pool.fetchval("SELECT count(*) FROM invoice_lines WHERE period = '2026-10'") == 1
    for hours, expected in ((1, set()), (47, set()), (49, {"2026-10"})):
        clock[0] = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=hours)
        await scheduler.tick()
        assert await closed() == expected, f"{hours} h after the month ended"
    # November's preview was refreshed meanwhile.
    assert await pool.fetchval("SELECT count(*) FROM invoice_lines WHERE period = '2026-11'") == 1


async def test_one_schedule_replica_works_and_another_takes_over_when_it_dies(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    url, pool = rollup_db
    # The leader writes this month's preview: the month must not end under the test.
    await clock.clear_of_midnight()
    await store(pool, [usage_event(unique("tenant"), customer_charge_usd="1")])  # earlier today
    ports = [free_port(), free_port()]
    replicas = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "llm_usage", "rollup", "schedule"),
            env={
                **os.environ,
                "DATABASE_URL": url,
                "METRICS_PORT": str(port),
                "RECONCILE_INTERVAL_MINUTES": "0",
            },
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:

        async def leaders() -> list[int]:
            return [n for n, port in enumerate(ports) if _leader_gauge(port) == 1.0]

        async def exactly_one_leads() -> bool:
            return len(await leaders()) == 1

        await _wait(exactly_one_leads, "no single leader")
        [leader] = await leaders()

        async def preview_refreshed() -> bool:
            return bool(await pool.fetchval("SELECT count(*) FROM invoice_lines") == 1)

        # The leader refreshes this month's preview: it reports leading before its first round
        # has committed, so the lines appear shortly after.
        await _wait(preview_refreshed, "the leader never refreshed the preview")
        assert await leaders() == [leader]
        replicas[leader].kill()
        await asyncio.wait_for(replicas[leader].wait(), 30)
        other = 1 - leader

        async def other_leads() -> bool:
            return _leader_gauge(ports[other]) == 1.0

        await _wait(other_leads, "the standby never took over")
    finally:
        for replica in replicas:
            if replica.returncode is None:
                replica.terminate()
        for replica in replicas:
            await asyncio.wait_for(replica.wait(), 30)


def _leader_gauge(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    for line in text.splitlines():
        if line.startswith("llm_usage_rollup_scheduler_leader "):
            return float(line.split()[1])
    return None


async def _wait(condition: Any, message: str, within: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.3)
    raise AssertionError(message)


async def test_a_bug_stops_the_schedule_with_one_line_and_a_failing_exit(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    url, pool = rollup_db
    # A bug, not an outage: a query against a table that is not there is never retried.
    await pool.execute("DROP TABLE invoice_periods CASCADE")
    env = {"DATABASE_URL": url, "METRICS_PORT": "0", "LOG_FORMAT": "json"}
    stopped = await asyncio.to_thread(_cli, env, "rollup", "schedule")
    assert stopped.returncode == 1, stopped.stderr
    *logged, last = stopped.stderr.strip().splitlines()
    assert last.startswith(
        "llm-usage: stopped: the rollup schedule stopped because a side task failed: "
        "UndefinedTableError"
    ), stopped.stderr
    errors = [entry["event"] for entry in map(json.loads, logged) if entry["level"] == "error"]
    assert errors == ["A side task stopped; stopping the worker."], stopped.stderr


async def _month_of_daily_totals(pool: asyncpg.Pool, tenants: Sequence[str], period: str) -> None:
    """Daily totals for every day of `period`, each tenant with two deployments and the null
    one, charges that differ by tenant, deployment and day; then ANALYZE, as autovacuum would."""
    first_day = parse_period(period)
    await pool.execute(
        """
        INSERT INTO usage_daily_totals
            (tenant_id, deployment_id, day, charge_usd, input_tokens, output_tokens, requests)
        SELECT t, d, day::date,
               (length(t) * 7 + coalesce(length(d), 0) + extract(day FROM day)) * 0.00012345,
               100 + n, 10 + n, 1 + n % 3
        FROM unnest($1::text[]) WITH ORDINALITY AS tenants (t, n),
             unnest(ARRAY['dep-1', 'dep-2', NULL]) AS d,
             generate_series($2::date, $3::date - 1, interval '1 day') AS day
        """,
        list(tenants),
        first_day,
        next_month(first_day),
    )
    await pool.execute("ANALYZE usage_daily_totals")


def _line_order(line: Any) -> tuple[str, bool, str]:
    return (line.tenant_id, line.deployment_id is not None, line.deployment_id or "")


async def test_a_month_of_many_tenants_is_billed_in_steps_with_every_tenant_once(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = rollup_db
    # Three steps; ids whose order is the database's (punctuation, case, digits of any width).
    tenants = [f"tenant-{n}" for n in range(2 * TENANTS_PER_STEP + 40)]
    tenants += ["Tenant-Upper", "tenant_under", "tenant-9-", "tenant é", "a", "zz"]
    await _month_of_daily_totals(pool, tenants, "2026-10")
    steps: list[tuple[int, int]] = []
    result = await run_rollup(
        pool, period="2026-10", progress=lambda done, total: steps.append((done, total))
    )
    assert steps == [(200, 446), (400, 446), (446, 446)]
    # What one query over the whole month gives, line for line.
    first_day = parse_period("2026-10")
    async with pool.acquire() as connection:
        whole_month = await monthly_usage(
            connection, first_day=first_day, next_month=next_month(first_day), tenants=None
        )
    by_tenant: dict[str, dict[str | None, Any]] = defaultdict(dict)
    for tenant, deployment, usage in whole_month:
        by_tenant[tenant][deployment] = usage
    expected = [
        line for tenant in by_tenant for line in usage_lines(tenant, "2026-10", by_tenant[tenant])
    ]
    assert {line.tenant_id for line in expected} == set(tenants)
    assert sorted(result.lines, key=_line_order) == sorted(expected, key=_line_order)
    assert len(result.lines) == len(expected) == 3 * len(tenants)


# The test's log listener is on its connection while the rollup has it, on purpose.
@pytest.mark.filterwarnings("ignore:.*being released to the pool but has 1 active log listener")
async def test_on_a_reused_connection_each_step_reads_its_own_tenants_from_the_index(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    """`rollup schedule` runs the month again and again on one connection: asyncpg keeps its
    statements prepared, and PostgreSQL plans them generically from their sixth execution on.
    Forced generic here, each step's plan (logged by auto_explain) must still read only its
    tenants' rows from the key's index: the "$3 IS NULL OR tenant_id = ANY($3)" the rollup once
    had scanned the whole month for every step instead (130 s for 10,000 tenants)."""
    url, setup = rollup_db
    await _month_of_daily_totals(setup, [f"tenant-{n:04d}" for n in range(600)], "2026-10")
    plans: list[str] = []

    async def explained(connection: asyncpg.Connection) -> None:
        await connection.execute("LOAD 'auto_explain'")

    async def generic_plans(connection: PoolConnectionProxy[asyncpg.Record]) -> None:
        # On every acquire: a pool's release drops the listener and resets the settings.
        connection.add_log_listener(lambda _, message: plans.append(message.message))
        await connection.execute(
            "SET auto_explain.log_min_duration = 0; SET auto_explain.log_level = notice; "
            "SET plan_cache_mode = force_generic_plan"
        )

    pool = await asyncpg.create_pool(
        url, min_size=1, max_size=1, init=explained, setup=generic_plans
    )
    assert pool is not None
    try:
        for _ in range(2):
            await run_rollup(pool, period="2026-10")
    finally:
        await pool.close()
    steps = [plan for plan in plans if "GROUP BY tenant_id, deployment_id" in plan]
    assert len(steps) == 2 * 3, plans
    for plan in steps:
        scans = [line.strip() for line in plan.splitlines() if "Scan" in line]
        assert len(scans) == 1, plan
        assert "Index Scan using usage_daily_totals_key" in scans[0], plan
        conditions = re.findall(r"Index Cond: (.*)", plan)
        assert len(conditions) == 1, plan
        assert "(tenant_id " in conditions[0], plan
        assert "$3" in conditions[0], f"not the generic plan: {plan}"
        assert "Filter:" not in plan, plan
