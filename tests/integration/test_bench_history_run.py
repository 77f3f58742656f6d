"""`llm-usage bench history` at tiny sizes: it starts its own PostgreSQL, loads both schemas,
lands new events through each write path, drops a month each way, prints its tables, and leaves
nothing behind."""

from __future__ import annotations

import pytest

from llm_usage.bench.history import run_history_benchmark
from llm_usage.core.errors import LocalServiceError
from llm_usage.local.paths import state_dir
from tests.unavailable import service_unavailable


async def test_bench_history_runs_small_and_cleans_up(capsys: pytest.CaptureFixture[str]) -> None:
    before = set(state_dir().glob("bench-history-*"))
    try:
        await run_history_benchmark(
            history="20000,40000",
            new_events=5000,
            month_rows=10000,
            tenants=50,
            keep_server=False,
        )
    except LocalServiceError as error:
        service_unavailable(f"no PostgreSQL for the bench: {error}")
    out = capsys.readouterr().out
    for schema in ("old", "new"):
        for history in ("20,000", "40,000"):
            assert f"| {schema} | {history} |" in out
        assert f"| {schema} | 1e+09 |" in out
        assert f"| {schema} | 1e+10 |" in out
    assert "| old | 10,000 | DELETE |" in out
    assert "| new | 10,000 | DETACH CONCURRENTLY + DROP |" in out
    assert set(state_dir().glob("bench-history-*")) == before
