"""`llm-usage bench reconcile` at a tiny size: it loads bench api's spread, fills every budget
counter the events make, and reconciles both months without drift, printing its figures."""

from __future__ import annotations

import json
import uuid

import pytest

from llm_usage.bench.reconcile import measure_reconcile
from llm_usage.core.settings import load_settings
from tests.integration.pipeline import drop_database

EVENTS = 2000
TENANTS = 4


async def test_bench_reconcile_reads_every_event_and_finds_no_drift(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"bench_reconcile_{uuid.uuid4().hex[:8]}"
    settings = load_settings(database_url=database_url)
    try:
        reports = await measure_reconcile(
            settings, database=database, events=EVENTS, tenants=TENANTS, repeats=2
        )
        out = capsys.readouterr().out
        assert "budget counters filled from the events in" in out
        assert [(report.events, report.drifts) for report in reports] == [(EVENTS, [])] * 2
        figures = json.loads(out.strip().splitlines()[-1])
        assert figures["bench"] == "reconcile"
        assert figures["events"] == EVENTS
        assert figures["drifts"] == [0, 0]
        assert len(figures["seconds"]) == 2
        assert figures["peak_rss_mib"] > 0
        assert f"run 2: {EVENTS:,} events in " in out

        # A second benchmark reuses the data and the counters.
        await measure_reconcile(
            settings, database=database, events=EVENTS, tenants=TENANTS, repeats=1
        )
        again = capsys.readouterr().out
        assert "reusing the events loaded before" in again
        assert "budget counters filled" not in again
    finally:
        await drop_database(database_url, database)
