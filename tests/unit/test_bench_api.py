"""The API benchmark's arithmetic and its command line."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from llm_usage.bench import cli
from llm_usage.bench.api import Latencies


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
