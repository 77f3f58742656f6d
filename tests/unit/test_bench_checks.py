"""`bench checks`' pure parts: the wrk script that POSTs a new check each time, the pacing of a
rate over connections, and the goal lines read from the steps."""

from __future__ import annotations

import re

import pytest

from llm_usage.bench.checks import (
    CHECK_CHARGE_USD,
    MAX_CONNECTIONS,
    Step,
    check_script,
    goal_lines,
    pacing,
)
from llm_usage.bench.wrk import RESULT_MARK, WrkResult


def test_the_script_posts_a_fresh_check_for_one_of_the_tenants() -> None:
    text = check_script(["tenant-0000", 'odd "one"'], run="r1", delay_ms=40)
    assert '"tenant-0000"' in text
    assert '"odd \\"one\\""' in text
    assert 'wrk.format("POST", "/v1/budget-checks", nil, body)' in text
    assert 'wrk.headers["Content-Type"] = "application/json"' in text
    # The id: the run, the wrk thread's seed and the thread's counter.
    assert '"gateway_request_id": "r1-%d-%d"' in text
    assert "seed, counter," in text
    assert f'"estimated_charge_usd": "{CHECK_CHARGE_USD}"' in text
    assert re.search(r"function delay\(\)\n  return 40\n", text)
    assert RESULT_MARK in text
    assert "function delay" not in check_script(["t"], run="r2", delay_ms=None)


@pytest.mark.parametrize(
    ("rate", "connections", "delay_ms"),
    [(1, 1, 1000), (20, 1, 50), (40, 2, 50), (500, 25, 50), (1000, 50, 50), (2000, 64, 32)],
)
def test_pacing_spreads_a_rate_over_connections(rate: int, connections: int, delay_ms: int) -> None:
    assert pacing(rate) == (connections, delay_ms)
    assert pacing(rate)[0] <= MAX_CONNECTIONS
    # Each connection's share, one request per delay, adds up to the rate (to within rounding).
    assert connections * 1000 / delay_ms == pytest.approx(rate, rel=0.02)


def _step(name: str, p99_ms: float, *, rate: int | None = None, non_2xx: int = 0) -> Step:
    result = WrkResult(100, 1.0, 1.0, p99_ms, p99_ms, non_2xx)
    return Step(name, rate, 1, result, allowed=100, denied=0)


def test_goals_and_the_hot_ceiling_are_read_from_the_steps() -> None:
    steps = [
        _step("one at a time", 9.9),
        _step("500/s over 1,000 tenants", 50.0, rate=500),
        _step("hot tenant 100/s", 12.0, rate=100),
        _step("hot tenant 250/s", 49.0, rate=250),
        _step("hot tenant 500/s", 80.0, rate=500),
        _step("deny-heavy, hot tenant 500/s", 5.0, rate=500),
    ]
    lines = goal_lines(steps, rate=500, tenants=1000).strip().splitlines()
    assert lines[0] == "goal: one at a time, p99 < 10 ms: met (9.9 ms)"
    assert lines[1] == (
        "goal: 500/s over 1,000 tenants, p99 < 50 ms: NOT met (50.0 ms at 100/s reached)"
    )
    assert lines[2] == (
        "hot tenant ceiling at p99 <= 50 ms: 100 checks/s reached (asked 250/s, p99 49.0 ms)"
    )
    failing = [*steps[:2], _step("hot tenant 100/s", 1.0, rate=100, non_2xx=3)]
    assert goal_lines(failing, rate=500, tenants=1000).endswith("below the lowest rate asked")
    easy = [*steps[:3]]
    assert goal_lines(easy, rate=500, tenants=1000).endswith("the ceiling is higher")
