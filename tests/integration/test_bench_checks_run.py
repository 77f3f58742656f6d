"""`llm-usage bench checks` at tiny sizes: it loads bench api's spread, makes every tenant's
policy block, starts one API process a core, drives `POST /v1/budget-checks` with wrk and prints
every figure it promises; the policies are put back and the holds emptied afterwards."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from decimal import Decimal

import asyncpg
import pytest

from llm_usage.bench.checks import measure_checks
from llm_usage.bench.support import bench_database
from llm_usage.core.settings import load_settings
from tests.unavailable import service_unavailable

MS = r"\d+\.\d ms"
TENANTS = 4


async def test_bench_checks_prints_each_step_the_goals_and_what_limits_it(
    database_url: str, kafka_bootstrap_servers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("wrk") is None:
        service_unavailable("no wrk on PATH for the bench (apt-get install wrk)")
    database = f"bench_checks_{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        database_url=database_url, kafka_bootstrap_servers=kafka_bootstrap_servers
    )
    try:
        steps = await measure_checks(
            settings,
            database=database,
            events=2000,
            tenants=TENANTS,
            seconds=1,
            rate=40,
            hot_rates=[20, 40],
        )
        out = capsys.readouterr().out
        assert "loaded and aggregated in" in out
        names = [step.name for step in steps]
        assert names[:2] == ["one at a time", f"40/s over {TENANTS} tenants"]
        assert names[-1] == "deny-heavy, hot tenant 40/s"
        assert set(names[2:-1]) <= {"hot tenant 20/s", "hot tenant 40/s"}
        for step in steps:
            # step, connections, asked/s, reached/s, p50, p99, max, allowed, denied, non-2xx
            row = (
                rf"\| {re.escape(step.name)} \| \d+ \| [\d,-]+ \| [\d,]+ \| {MS} \| {MS} "
                rf"\| {MS} \| [\d,]+ \| [\d,]+ \| [\d,]+ \|"
            )
            assert re.search(row, out), (row, out)
            # Every check answered was decided once in the database; wrk stops with at most
            # one request a connection in flight, decided but not counted as answered.
            decided, answered = step.allowed + step.denied, step.result.requests
            assert 0 <= decided - (answered - step.result.non_2xx) <= step.connections, step
        # Limits too large to deny, then below any spend: the allow path, then the deny path.
        assert all(step.denied == 0 and step.allowed > 0 for step in steps[:-1])
        assert steps[-1].allowed == 0 < steps[-1].denied
        assert re.search(rf"goal: one at a time, p99 < 10 ms: (met|NOT met) \({MS}\)", out)
        assert re.search(
            rf"goal: 40/s over {TENANTS} tenants, p99 < 50 ms: (met|NOT met) \({MS} at [\d,]+/s",
            out,
        )
        assert "hot tenant ceiling at p99 <= 50 ms: " in out
        assert re.search(r"- hot tenant 20/s: .*\(\d+ samples\); API \d+\.\d s, PostgreSQL", out)
        report = json.loads(out.strip().splitlines()[-1])
        assert report["bench"] == "checks"
        assert [step["step"] for step in report["steps"]] == names
        assert all(step["samples"] > 0 for step in report["steps"][1:])

        # The tenants' policies are back as bench api loaded them, and no hold is left.
        connection = await asyncpg.connect(await bench_database(database_url, database))
        try:
            policies = await connection.fetch(
                "SELECT daily_limit_usd, monthly_limit_usd, enforcement FROM budget_policies"
            )
            held = await connection.fetchval("SELECT count(*) FROM budget_held")
        finally:
            await connection.close()
        assert len(policies) == TENANTS
        assert {tuple(row) for row in policies} == {(Decimal(50), Decimal(1000), "alert")}
        assert held == 0
    finally:
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await connection.close()
