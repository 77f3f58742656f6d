"""`llm-usage bench budget --corrections N` at a tiny size on the test's own services: the budget
consumer drains the backlog without and with the corrections, every correction applied or
parked, and with/without is reported."""

from __future__ import annotations

import re

import pytest

from llm_usage.bench.budget import run_budget_benchmark


async def test_bench_budget_measures_the_backlog_with_corrections_beside_the_one_without(
    kafka_bootstrap_servers: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap_servers)
    monkeypatch.setenv("DATABASE_URL", database_url)
    await run_budget_benchmark(
        rate=200,
        seconds=1.0,
        tenants=3,
        deployments=1,
        backlog_events=1000,
        dup_rate=0.1,
        corrections=100,
        corrections_runs=1,
    )
    out = capsys.readouterr().out
    assert "corrections: the backlog with 100 corrections mixed in, 1,100 records published" in out
    # Both drains stored and counted every unique event (checked in the run), and the round's
    # figures count the 1,000 events and then the 1,100 records.
    [(events_rate, records_rate)] = re.findall(
        r"  round 1: without [\d,]+ events/s \([\d.]+ s\); with 100 corrections ([\d,]+) "
        r"events/s, ([\d,]+) records/s",
        out,
    )
    assert float(records_rate.replace(",", "")) == pytest.approx(
        float(events_rate.replace(",", "")) * 1100 / 1000, abs=2
    )
    assert re.search(r"  with/without [\d.]+ \([\d.]+-[\d.]+\)   target >= 0.9: (met|MISSED)", out)
