"""`llm-usage bench ingest|budget|api|checks|rollup|ingest-aggregate|history|lifecycle|
reconcile`: each benchmark's arguments; the benchmark itself is imported when it runs (httpx and
the profilers are not in every install)."""

from __future__ import annotations

import argparse
import importlib
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from llm_usage.bench.api_data import event_counts
from llm_usage.cli.args import Commands, fraction, non_negative_int, positive_int, positive_seconds

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings

# Every benchmark finds or starts local services itself (settings_for_local_run), so none reads
# the settings it is handed.


def _runs(module: str, function: str) -> Callable[[argparse.Namespace, Settings], Awaitable[None]]:
    """A runner that imports `module` only when the benchmark runs and calls its `function` with
    the parsed options its parameters name (each option's dest is its parameter's name)."""

    async def run(args: argparse.Namespace, settings: Settings) -> None:
        benchmark = getattr(importlib.import_module(module), function)
        parameters = inspect.signature(benchmark).parameters
        await benchmark(**{name: getattr(args, name) for name in parameters})

    return run


def add_parser(commands: Commands) -> None:
    bench = commands.add_parser("bench", help="measure throughput against baselines")
    benchmarks = bench.add_subparsers(dest="bench_command", required=True)
    _add_ingest(benchmarks)
    _add_budget(benchmarks)
    _add_api(benchmarks)
    _add_checks(benchmarks)
    _add_rollup(benchmarks)
    _add_ingest_aggregate(benchmarks)
    _add_history(benchmarks)
    _add_lifecycle(benchmarks)
    _add_reconcile(benchmarks)


def _add_ingest(benchmarks: Commands) -> None:
    ingest = benchmarks.add_parser("ingest", help="usage consumer vs naive vs COPY ceiling")
    ingest.add_argument("--events", type=positive_int, default=200_000)
    ingest.add_argument("--dup-rate", type=fraction, default=0.1)
    ingest.add_argument(
        "--naive-events",
        type=positive_int,
        default=5_000,
        help="events for the one-at-a-time baseline (it is slow; its rate is what counts)",
    )
    ingest.add_argument(
        "--runs",
        type=positive_int,
        default=3,
        help="rounds of (a), (b), (c), interleaved; medians and spreads over them",
    )
    ingest.add_argument(
        "--estimated-share",
        type=fraction,
        default=0.2,
        help="(e): (a) again with this share of the events sent without a charge (0: skip)",
    )
    ingest.add_argument(
        "--corrections",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="(k): (a) again with N corrections mixed in (40%% void, 50%% amend, 10%% "
        "corrected twice, 1%% before their event) [0: skip]",
    )
    ingest.set_defaults(run=_runs("llm_usage.bench.ingest", "run_ingest_benchmark"))


def _add_budget(benchmarks: Commands) -> None:
    budget = benchmarks.add_parser(
        "budget", help="alert latency at a fixed rate; budget vs usage consumer throughput"
    )
    budget.add_argument("--rate", type=positive_int, default=5_000, help="events/s")
    budget.add_argument("--seconds", type=positive_seconds, default=60.0)
    budget.add_argument("--tenants", type=positive_int, default=1_000)
    budget.add_argument(
        "--deployments", type=positive_int, default=3, help="deployments with a policy, per tenant"
    )
    budget.add_argument(
        "--backlog-events",
        type=positive_int,
        default=200_000,
        help="events both consumers drain for the throughput comparison",
    )
    budget.add_argument("--dup-rate", type=fraction, default=0.1)
    budget.add_argument(
        "--profile-consumer",
        metavar="FILE",
        type=Path,
        help="run the budget consumer under pyinstrument (dev extra); .html or text report",
    )
    budget.add_argument(
        "--corrections",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="the budget consumer on the backlog with N corrections mixed in (the mix of "
        "bench ingest --corrections) and without, alternately [0: skip]",
    )
    budget.add_argument(
        "--corrections-runs",
        type=positive_int,
        default=3,
        help="rounds of without/with corrections; medians and spreads over them",
    )
    budget.set_defaults(run=_runs("llm_usage.bench.budget", "run_budget_benchmark"))


def _add_api(benchmarks: Commands) -> None:
    api = benchmarks.add_parser(
        "api",
        help="HTTP API (wrk, one API process a core): reports one at a time by a tenant's size, "
        "old and new; 50 clients; HTTP ingest",
    )
    api.add_argument(
        "--sizes",
        type=_event_counts,
        default="1k,100k,1m,10m",
        help="events of each sized tenant, all in last month (default: 1k,100k,1m,10m)",
    )
    api.add_argument("--events", type=positive_int, default=10_000_000)
    api.add_argument("--tenants", type=positive_int, default=1_000)
    api.add_argument("--clients", type=positive_int, default=50)
    api.add_argument("--seconds", type=float, default=30.0)
    api.add_argument("--ingest-events", type=positive_int, default=50_000)
    api.set_defaults(run=_runs("llm_usage.bench.api", "run_api_benchmark"))


def _add_checks(benchmarks: Commands) -> None:
    checks = benchmarks.add_parser(
        "checks",
        help="POST /v1/budget-checks (wrk, one API process a core) on bench api's data: one at a "
        "time, a paced rate over tenants, one hot tenant's ceiling",
    )
    checks.add_argument(
        "--events",
        type=positive_int,
        default=10_000_000,
        help="events of bench api's spread (loaded once, then reused; the same as bench api's)",
    )
    checks.add_argument("--tenants", type=positive_int, default=1_000)
    checks.add_argument("--seconds", type=positive_seconds, default=20.0, help="per step")
    checks.add_argument("--rate", type=positive_int, default=500, help="checks/s over every tenant")
    checks.add_argument(
        "--hot-rates",
        type=_rates,
        default="100,250,500,1000,2000",
        metavar="N,N,...",
        help="checks/s of one hot tenant, stepped through until p99 passes 50 ms",
    )
    checks.set_defaults(run=_runs("llm_usage.bench.checks", "run_checks_benchmark"))


def _rates(text: str) -> list[int]:
    try:
        rates = [positive_int(part) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"not rates: {text!r} (checks/s, e.g. 100,250,500)"
        ) from None
    if not rates:
        raise argparse.ArgumentTypeError("name at least one rate, e.g. 100,250")
    return sorted(set(rates))


def _event_counts(text: str) -> list[int]:
    try:
        return event_counts(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_rollup(benchmarks: Commands) -> None:
    rollup = benchmarks.add_parser(
        "rollup", help="rollup run for a month vs the raw GROUP BY over its events, 1M to 10M"
    )
    rollup.add_argument("--events", type=positive_int, default=10_000_000)
    rollup.add_argument("--tenants", type=positive_int, default=1_000)
    rollup.add_argument(
        "--deployments", type=positive_int, default=3, help="deployments per tenant"
    )
    rollup.add_argument(
        "--sizes",
        default="1000000,10000000",
        metavar="N,N,...",
        help="event counts to measure at, growing (--events is always the last)",
    )
    rollup.add_argument(
        "--batch", type=positive_int, default=5_000, help="events per load transaction"
    )
    rollup.add_argument("--repeats", type=positive_int, default=3)
    rollup.add_argument("--seed", default="rollup-bench")
    rollup.add_argument(
        "--keep-database", action="store_true", help="keep llm_usage_bench_rollup afterwards"
    )
    rollup.set_defaults(run=_runs("llm_usage.bench.rollup", "run_rollup_benchmark"))


def _add_ingest_aggregate(benchmarks: Commands) -> None:
    aggregate = benchmarks.add_parser(
        "ingest-aggregate", help="usage consumer with vs without the rollup's daily pre-aggregate"
    )
    aggregate.add_argument("--events", type=positive_int, default=200_000)
    aggregate.add_argument("--dup-rate", type=fraction, default=0.1)
    aggregate.add_argument("--tenants", type=positive_int, default=1_000)
    aggregate.add_argument("--deployments", type=positive_int, default=3)
    aggregate.add_argument(
        "--rounds", type=positive_int, default=2, help="pairs of runs, alternating which is first"
    )
    aggregate.set_defaults(run=_runs("llm_usage.bench.rollup", "run_aggregate_cost_benchmark"))


def _add_history(benchmarks: Commands) -> None:
    history = benchmarks.add_parser(
        "history",
        help="the usage write path over 2M and 20M rows of history, old schema vs partitioned",
    )
    history.add_argument(
        "--history",
        default="2000000,20000000",
        metavar="N,N,...",
        help="rows of history to measure at, growing",
    )
    history.add_argument(
        "--new-events", type=positive_int, default=200_000, help="events landed per measurement"
    )
    history.add_argument(
        "--month-rows", type=positive_int, default=10_000_000, help="rows in the month dropped"
    )
    history.add_argument("--tenants", type=positive_int, default=300)
    history.add_argument(
        "--keep-server", action="store_true", help="keep the bench's PostgreSQL and its data"
    )
    history.set_defaults(run=_runs("llm_usage.bench.history", "run_history_benchmark"))


def _add_lifecycle(benchmarks: Commands) -> None:
    lifecycle = benchmarks.add_parser(
        "lifecycle",
        help="usage consumer batch times while months are created, detached, archived, dropped",
    )
    lifecycle.add_argument("--events", type=positive_int, default=200_000)
    lifecycle.add_argument(
        "--interval",
        type=positive_seconds,
        default=2.0,
        help="seconds between maintenance rounds",
    )
    lifecycle.add_argument(
        "--advance-every",
        type=positive_int,
        default=5,
        help="rounds per month that maintenance's 'today' moves on (4 months dropped in all)",
    )
    lifecycle.add_argument("--batch", type=positive_int, default=500, help="CONSUMER_MAX_BATCH")
    lifecycle.set_defaults(run=_runs("llm_usage.bench.lifecycle", "run_lifecycle_benchmark"))


def _add_reconcile(benchmarks: Commands) -> None:
    reconcile = benchmarks.add_parser(
        "reconcile",
        help="reconcile over bench api's data (this and last month, without the alerts topic)",
    )
    reconcile.add_argument(
        "--events",
        type=positive_int,
        default=10_000_000,
        help="events of bench api's spread (loaded once, then reused; the same as bench api's)",
    )
    reconcile.add_argument("--tenants", type=positive_int, default=1_000)
    reconcile.add_argument("--repeats", type=positive_int, default=3)
    reconcile.set_defaults(run=_runs("llm_usage.bench.reconcile", "run_reconcile_benchmark"))
