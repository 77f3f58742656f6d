"""`llm-usage bench api` at tiny sizes: it loads its tenants, starts one API process a core on
one port, drives them with wrk and prints every figure it promises, old beside new."""

from __future__ import annotations

import functools
import re
import shutil
import uuid

import asyncpg
import pytest

from llm_usage.bench.api import measure_api
from llm_usage.core.settings import load_settings
from tests.unavailable import service_unavailable

SIZES = [300, 3000]
MS = r"\d+\.\d ms"


async def test_bench_api_prints_old_and_new_figures_by_tenant_size(
    database_url: str, kafka_bootstrap_servers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("wrk") is None:
        service_unavailable("no wrk on PATH for the bench (apt-get install wrk)")
    database = f"bench_api_{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        database_url=database_url, kafka_bootstrap_servers=kafka_bootstrap_servers
    )
    run = functools.partial(
        measure_api, settings, database=database, events=4000, tenants=20, seconds=1
    )
    try:
        await run(sizes=SIZES, clients=4, ingest_events=1000)
        out = capsys.readouterr().out
        assert "loaded and aggregated in" in out
        for size in SIZES:
            for route in ("breakdown", "summary", "daily"):
                # events | route | requests/s | p50 | p99 | before: p50 | before: p99 | runs
                figures = rf"[\d,]+ \| {MS} \| {MS} \| {MS} \| {MS} \| [\d,]+"
                row = rf"\| {size:,} \| {route} \| {figures} \|"
                assert re.search(row, out), (row, out)
        for route in ("breakdown", "summary", "daily"):
            assert re.search(rf"{route}: p99 from 300 to 3,000 events x[\d.]+ \(before: x", out)
        assert re.search(r"4 connections over every route of 22 tenants .* requests/s, p50", out)
        assert re.search(r"goal: one at a time, p99 < 20 ms .*: (met|NOT met) \(worst", out)
        assert re.search(r"goal: under load, p99 < 100 ms: (met|NOT met) \(", out)
        assert re.search(r"ingest: POST /v1/usage-events [\d,]+ events/s", out)
        # A second run reuses what the first loaded.
        await run(sizes=SIZES[:1], clients=2, ingest_events=0)
        again = capsys.readouterr().out
        assert "reusing the events loaded before" in again
        assert "| 300 | summary |" in again
        assert "ingest:" not in again
    finally:
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await connection.close()
