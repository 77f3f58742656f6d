"""`llm-usage bench`: each benchmark is called with exactly the options its command parses."""

from __future__ import annotations

import argparse
import importlib
import inspect
from typing import Any

import pytest

from llm_usage.bench import cli
from llm_usage.core.settings import Settings

BENCHMARKS = {
    "ingest": ("llm_usage.bench.ingest", "run_ingest_benchmark"),
    "budget": ("llm_usage.bench.budget", "run_budget_benchmark"),
    "api": ("llm_usage.bench.api", "run_api_benchmark"),
    "checks": ("llm_usage.bench.checks", "run_checks_benchmark"),
    "rollup": ("llm_usage.bench.rollup", "run_rollup_benchmark"),
    "ingest-aggregate": ("llm_usage.bench.rollup", "run_aggregate_cost_benchmark"),
}


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
async def test_each_benchmark_gets_every_option_it_takes(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, function = BENCHMARKS[name]
    called: dict[str, Any] = {}
    benchmark = getattr(importlib.import_module(module), function)

    async def record(**options: Any) -> None:
        called.update(options)

    monkeypatch.setattr(record, "__signature__", inspect.signature(benchmark), raising=False)
    monkeypatch.setattr(importlib.import_module(module), function, record)
    args = _parse(name)
    await args.run(args, Settings())

    assert set(called) == set(inspect.signature(benchmark).parameters)
    assert all(called[option] == getattr(args, option) for option in called)


def test_an_option_reaches_its_benchmark_as_parsed() -> None:
    args = _parse("budget", "--profile-consumer", "out.html", "--rate", "7")
    assert (str(args.profile_consumer), args.rate) == ("out.html", 7)
    args = _parse("budget", "--corrections", "10000", "--corrections-runs", "2")
    assert (args.corrections, args.corrections_runs) == (10_000, 2)
    assert (_parse("budget").corrections, _parse("budget").corrections_runs) == (0, 3)
    for bad in (("--corrections", "-1"), ("--corrections-runs", "0")):
        with pytest.raises(SystemExit):
            _parse("budget", *bad)


def test_checks_takes_its_hot_rates_as_a_list_of_rates() -> None:
    args = _parse("checks", "--hot-rates", "500,100,100", "--seconds", "1", "--events", "2000")
    assert (args.hot_rates, args.seconds, args.events) == ([100, 500], 1.0, 2000)
    assert _parse("checks").hot_rates == [100, 250, 500, 1000, 2000]
    for bad in ("0,100", "fast", ","):
        with pytest.raises(SystemExit):
            _parse("checks", "--hot-rates", bad)
