"""`llm-usage bench ingest --corrections N` at a tiny size on the test's own services: (k) drains
the stream with the corrections mixed in, every correction judged, and k/a is reported."""

from __future__ import annotations

import re

import pytest

from llm_usage.bench.ingest import run_ingest_benchmark


async def test_bench_ingest_measures_the_stream_with_corrections_beside_the_one_without(
    kafka_bootstrap_servers: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap_servers)
    monkeypatch.setenv("DATABASE_URL", database_url)
    await run_ingest_benchmark(
        events=2000, dup_rate=0.1, naive_events=50, runs=1, estimated_share=0, corrections=200
    )
    out = capsys.readouterr().out
    # The same unique events stored from the stream with its 200 corrections: none is lost, and
    # the corrections count as records read.
    [(rows, read)] = re.findall(r"  \(a\) ([\d,]+) rows from ([\d,]+) events read", out)
    assert read == "2,000"
    assert f"  (k) 200 corrections mixed in: {rows} rows from 2,200 events read" in out
    assert "k/a            " in out
