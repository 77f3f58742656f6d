"""The API benchmark's arithmetic and its command line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from llm_usage.bench import cli
from llm_usage.bench.api import (
    Latencies,
    SizedFigures,
    goal_lines,
    growth_lines,
    mixed_paths,
    route_paths,
)
from llm_usage.bench.api_data import Months, event_counts
from llm_usage.bench.wrk import (
    RESULT_MARK,
    WrkMissingError,
    WrkResult,
    lua_script,
    parse_result,
    wrk_binary,
)
from tests import clock


def test_percentiles_are_of_the_sorted_latencies_in_milliseconds() -> None:
    latencies = Latencies([n / 1000 for n in range(100, 0, -1)])  # 1 ms ... 100 ms
    assert latencies.percentile(0.5) == pytest.approx(51)
    assert latencies.percentile(0.99) == pytest.approx(100)
    assert Latencies([0.002]).percentile(0.99) == pytest.approx(2)


def test_the_defaults_are_the_issues_load() -> None:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "api"])
    assert (args.events, args.tenants, args.clients) == (10_000_000, 1_000, 50)
    assert args.sizes == [1_000, 100_000, 1_000_000, 10_000_000]
    assert parser.parse_args(["bench", "api", "--sizes", "2k,500"]).sizes == [500, 2000]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "api", "--sizes", "1g"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "api", "--clients", "0"])


def test_building_the_command_line_imports_no_benchmark_stack() -> None:
    """`llm-usage --help` builds this parser; httpx is a dev dependency only."""
    code = (
        "import sys, llm_usage.bench.cli; "
        "heavy = {'httpx', 'asyncpg', 'aiokafka', 'jwt'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("text", "counts"),
    [("1k,100k,1m,10m", [1_000, 100_000, 1_000_000, 10_000_000]), ("10M, 7", [7, 10_000_000])],
)
def test_sizes_read_as_event_counts(text: str, counts: list[int]) -> None:
    assert event_counts(text) == counts


@pytest.mark.parametrize("text", ["", "k", "0", "-1k", "1.5m", "1g"])
def test_a_size_that_is_no_count_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|number of events"):
        event_counts(text)


def test_the_month_asked_for_is_last_months_whole_days() -> None:
    months = Months.around(clock.now())
    (summary,) = route_paths("summary", "sized-1k", months)
    assert summary.endswith(
        f"from={months.last.date().isoformat()}&to={months.this.date().isoformat()}"
    )
    assert months.last.day == months.this.day == 1
    assert months.last < months.this <= months.now
    assert len(route_paths("breakdown", "t", months)) == 7
    mix = mixed_paths(["a", "b"], months)
    assert len(mix) == 8
    assert {path.split("/")[3] for path in mix} == {"a", "b"}


def test_the_wrk_script_lists_the_paths_and_prints_one_result_line() -> None:
    script = lua_script(["/v1/a?x=1", '/v1/"b"'])
    assert '"/v1/a?x=1"' in script
    assert '"/v1/\\"b\\""' in script
    assert RESULT_MARK in script
    with pytest.raises(ValueError, match="path"):
        lua_script(["no-slash"])


def _output(**figures: int) -> str:
    found = {"requests": 200, "duration_us": 2_000_000, "non_2xx": 0, "socket_errors": 0}
    found |= {"p50_us": 1500, "p99_us": 9000, "max_us": 12000} | figures
    return "Running 2s test\n" + RESULT_MARK + json.dumps(found) + "\n"


def test_wrks_result_is_read_in_milliseconds() -> None:
    result = parse_result(_output())
    assert (result.requests, result.p50_ms, result.p99_ms, result.max_ms) == (200, 1.5, 9.0, 12.0)
    assert result.per_second == pytest.approx(100)


@pytest.mark.parametrize("figures", [{"non_2xx": 1}, {"socket_errors": 3}, {"requests": 0}])
def test_a_run_with_errors_or_no_request_measures_nothing(figures: dict[str, int]) -> None:
    with pytest.raises(SystemExit):
        parse_result(_output(**figures))


def test_no_result_line_is_an_error() -> None:
    with pytest.raises(SystemExit, match="no result line"):
        parse_result("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_without_wrk_one_line_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(WrkMissingError) as raised:
        wrk_binary()
    assert "apt-get install wrk" in str(raised.value.code)
    assert "\n" not in str(raised.value.code)


def _figures(events: int, route: str, new_p99: float, old_p99: float) -> SizedFigures:
    return SizedFigures(
        events, route, WrkResult(10, 1.0, 1.0, new_p99, new_p99), Latencies([old_p99 / 1000])
    )


def test_growth_is_the_largest_tenants_p99_over_the_smallests() -> None:
    sized = [
        _figures(10_000_000, "summary", 6.0, 3500.0),
        _figures(1000, "summary", 4.0, 5.0),
        _figures(1000, "daily", 4.0, 5.0),
    ]
    assert growth_lines(sized).strip() == (
        "summary: p99 from 1,000 to 10,000,000 events x1.5 (before: x700.0)"
    )


@pytest.mark.parametrize(
    ("worst", "mixed", "one", "many"),
    [
        (19.9, 99.9, "met", "met"),
        (20.0, 100.0, "NOT met", "NOT met"),
        (25.0, 50.0, "NOT met", "met"),
    ],
)
def test_the_goals_are_strictly_below_20_and_100_ms(
    worst: float, mixed: float, one: str, many: str
) -> None:
    sized = [_figures(1000, "summary", 3.0, 1.0), _figures(10_000_000, "breakdown", worst, 1.0)]
    lines = goal_lines(sized, WrkResult(100, 1.0, 1.0, mixed, mixed)).strip().splitlines()
    assert lines[0].startswith("goal: one at a time")
    assert f": {one} (worst {worst}" in lines[0]
    assert "breakdown of 10,000,000 events" in lines[0]
    assert lines[1].endswith(f": {many} ({mixed} ms)")
