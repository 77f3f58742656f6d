"""`bench budget`'s pure pieces: pacing, percentiles, limits that get crossed, the predicted
alerts and the checks of what arrived."""

from __future__ import annotations

import json
import random
from array import array
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from llm_usage.bench.budget import (
    ArrivedAlert,
    CorrectionsRound,
    LatencySummary,
    MemoryRun,
    alert_latencies,
    build_workload,
    check_alerts,
    corrections_lines,
    corrections_round_line,
    due_count,
    latency_split,
    limit_for,
    memory_verdict,
    metric_totals,
    percentile,
    predicted_alerts,
)
from llm_usage.consumers.budget.crossing import Contribution
from llm_usage.domain.budgets import (
    AlertLevel,
    BudgetWindow,
    CounterKey,
    ScopeType,
    alert_id_for,
)
from llm_usage.domain.policies import BudgetPolicy

C = Contribution
D = Decimal
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("elapsed", "rate", "total", "due"),
    [
        (-1.0, 5000, 100, 0),
        (0.0, 5000, 100, 0),
        (0.0001, 5000, 100, 0),
        (0.0002, 5000, 100, 1),
        (0.01, 5000, 100, 50),
        (1.0, 5000, 100, 100),  # never more than there is
        (2.5, 3, 100, 7),
    ],
)
def test_due_count_paces_sends(elapsed: float, rate: float, total: int, due: int) -> None:
    assert due_count(elapsed, rate, total) == due


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.0
    assert percentile([1.0, 2.0], 51) == 2.0


@pytest.mark.parametrize("pct", [0, -1, 101])
def test_percentile_refuses_nonsense(pct: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], pct)
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_latency_summary_sorts_first() -> None:
    summary = LatencySummary.of([0.5, 0.1, 0.9, 0.3])
    assert (summary.count, summary.p50, summary.p95, summary.p99, summary.max) == (
        4,
        0.3,
        0.9,
        0.9,
        0.9,
    )


def test_limit_is_a_share_of_the_spend_rounded_down() -> None:
    assert limit_for(D("100"), 0.5) == D("50")
    assert limit_for(D("0.0000000003"), 0.5) == D("0.0000000001")
    assert limit_for(D("0.0000000001"), 0.5) is None  # would be 0: no policy
    limit = limit_for(D("1.2345678901"), 0.95)
    assert limit is not None
    assert limit < D("1.2345678901")


def _policy(scope_type: ScopeType, scope_id: str, limit: str) -> BudgetPolicy:
    return BudgetPolicy(
        tenant_id="t1",
        scope_type=scope_type,
        scope_id=scope_id,
        monthly_limit_usd=D(limit),
        warn_threshold_pct=80,
    )


def _alert_id(scope_type: ScopeType, scope_id: str, level: AlertLevel, limit: str) -> str:
    return alert_id_for(
        tenant_id="t1",
        scope_type=scope_type,
        scope_id=scope_id,
        window=BudgetWindow.MONTHLY,
        period_start=date(2026, 11, 1),
        level=level,
        limit_usd=D(limit),
    )


def test_predicted_alerts_name_the_crossing_events() -> None:
    month = date(2026, 11, 1)
    tenant = CounterKey("t1", ScopeType.TENANT, "t1", BudgetWindow.MONTHLY, month)
    deployment = CounterKey("t1", ScopeType.DEPLOYMENT, "d1", BudgetWindow.MONTHLY, month)
    user = CounterKey("t1", ScopeType.USER, "u1", BudgetWindow.MONTHLY, month)
    contributions = {
        tenant: [C("e1", D("5")), C("e2", D("4")), C("e3", D("2"))],
        deployment: [C("e1", D("5")), C("e3", D("2"))],
        user: [C("e2", D("4"))],  # no policy: no alert
    }
    expected = predicted_alerts(
        contributions,
        [_policy(ScopeType.TENANT, "t1", "10"), _policy(ScopeType.DEPLOYMENT, "d1", "100")],
    )
    assert expected == {
        _alert_id(ScopeType.TENANT, "t1", AlertLevel.WARNING, "10"): "e2",  # 9 >= 8
        _alert_id(ScopeType.TENANT, "t1", AlertLevel.EXCEEDED, "10"): "e3",  # 11 >= 10
    }


def test_every_policy_of_a_workload_crosses_both_levels() -> None:
    workload = build_workload(
        random.Random(7),
        id_prefix="e",
        tenant_prefix="t-",
        events=2000,
        tenants=5,
        deployments=2,
        dup_rate=0.1,
        now=NOW,
    )
    assert len(workload.records) == 2000
    assert workload.unique < 2000  # some re-sends
    assert len(workload.policies) == 5 * 3  # each tenant and both of its deployments
    assert len(workload.expected) == 2 * len(workload.policies)
    assert set(workload.expected.values()) <= workload.index_of.keys()
    for index, first in enumerate(workload.first_index):
        value = json.loads(workload.records[index][1])
        assert first == workload.index_of[value["gateway_request_id"]]
        assert first <= index
        assert workload.records[index][0] == value["tenant_id"].encode()
    # The events beside their records, for the corrections mixed into the same backlog.
    assert [(key, value) for key, value, _ in workload.stream] == workload.records


def _arrived(alert_id: str, triggered_by: str | None, at: float) -> ArrivedAlert:
    return ArrivedAlert(alert_id=alert_id, tenant_id="t1", triggered_by=triggered_by, arrived_at=at)


def test_check_alerts_counts_each_kind_of_wrong() -> None:
    expected = {"a": "e1", "b": "e2", "c": "e3", "d": "e4"}
    arrived = [
        _arrived("a", "e1", 1.0),
        _arrived("a", "e1", 2.0),  # twice
        _arrived("b", "e9", 1.0),  # another trigger
        _arrived("c", None, 1.0),  # another trigger, and none
        _arrived("x", "e5", 1.0),  # unexpected
    ]  # "d" missing
    check = check_alerts(expected, arrived)
    assert (check.expected, check.arrived, check.missing, check.unexpected) == (4, 4, 1, 1)
    assert (check.twice, check.other_trigger, check.no_trigger) == (1, 2, 1)
    assert not check.clean
    assert check_alerts({"a": "e1"}, [_arrived("a", "e1", 1.0)]).clean


def test_latency_is_arrival_minus_the_triggering_publish() -> None:
    index_of = {"e0": 0, "e1": 1, "e2": 2}
    stamps = array("d", [10.0, 11.0, 0.0])  # e2 never stamped: not published by this run
    arrived = [
        _arrived("a", "e1", 11.25),
        _arrived("a", "e1", 15.0),  # a second copy is not a second latency
        _arrived("b", "e0", 10.5),
        _arrived("c", None, 12.0),  # a policy change: no event to measure from
        _arrived("d", "e2", 12.0),
        _arrived("e", "elsewhere", 12.0),
    ]
    assert alert_latencies(arrived, index_of, stamps) == [0.25, 0.5]


def test_latency_split_at_the_decision() -> None:
    index_of = {"e0": 0, "e1": 1}
    stamps = array("d", [10.0, 11.0])  # perf_counter() stamps; wall clock = stamp + 1000
    arrived = [
        _arrived("a", "e0", 10.75),
        _arrived("a", "e0", 12.0),  # a second copy
        _arrived("b", "e1", 11.5),
        _arrived("c", "e1", 11.5),  # not in the outbox: left out
    ]
    to_decided, to_arrival = latency_split(
        arrived, index_of, stamps, {"a": 1010.25, "b": 1011.125}, perf_to_wall=1000.0
    )
    assert to_decided == [0.25, 0.125]
    assert to_arrival == [0.5, 0.375]


def test_metric_totals_keep_one_consumer() -> None:
    exposition = "\n".join(
        [
            "# TYPE llm_usage_consumer_batch_size histogram",
            'llm_usage_consumer_batch_size_count{consumer="budget"} 3.0',
            'llm_usage_consumer_batch_size_sum{consumer="budget"} 300.0',
            'llm_usage_consumer_batch_size_count{consumer="usage"} 7.0',
            "# TYPE llm_usage_budget_alerts_published_total counter",
            'llm_usage_budget_alerts_published_total{level="warning"} 2.0',
            'llm_usage_budget_alerts_published_total{level="exceeded"} 1.0',
            "",
        ]
    )
    totals = metric_totals(exposition, consumer="budget")
    assert totals["llm_usage_consumer_batch_size_count"] == 3.0
    assert totals["llm_usage_consumer_batch_size_sum"] == 300.0
    assert totals["llm_usage_budget_alerts_published_total"] == 3.0


def _memory_run(*, batches: float, batch_events: float) -> MemoryRun:
    return MemoryRun(
        batch=20_000,
        events=200_000,
        counted=180_000,
        seconds=12.0,
        ready_rss_bytes=90 * 1024 * 1024,
        most_sampled_rss_bytes=140 * 1024 * 1024,
        rss_profile=(90 * 1024 * 1024, 140 * 1024 * 1024),
        peak_rss_bytes=150 * 1024 * 1024,
        batches=batches,
        batch_events=batch_events,
        cpu_seconds=10.0,
        outbox="ok",
        log_path=Path("budget.log"),
    )


def test_the_memory_figure_counts_only_with_batches_near_the_batch_size() -> None:
    full = _memory_run(batches=10, batch_events=200_000)
    assert full.mean_batch == 20_000
    assert memory_verdict(full) == "budget consumer peak RSS 150 MiB at BUDGET_MAX_BATCH 20,000"
    thin = memory_verdict(_memory_run(batches=100, batch_events=200_000))
    assert "batches averaged 10% of 20,000: not a figure at the batch size" in thin
    assert "not a figure" in memory_verdict(_memory_run(batches=0, batch_events=0))


def test_the_corrected_backlog_is_compared_by_its_events_and_its_records() -> None:
    # 200,000 events and 10,000 corrections: 10.0 s without, 10.5 s with them.
    run = CorrectionsRound(
        events=200_000, corrections=10_000, plain_seconds=10.0, corrected_seconds=10.5
    )
    assert run.plain_rate == 20_000
    assert run.corrected_rate == pytest.approx(200_000 / 10.5)  # events only
    assert run.corrected_records_rate == 20_000  # corrections included
    assert run.ratio == pytest.approx(10.0 / 10.5)
    assert corrections_round_line(2, run) == (
        "  round 2: without 20,000 events/s (10.00 s); with 10,000 corrections 19,048 events/s, "
        "20,000 records/s (10.50 s); with/without 0.952"
    )


def test_the_corrections_goal_is_judged_on_the_median_round() -> None:
    def run(corrected_seconds: float) -> CorrectionsRound:
        return CorrectionsRound(
            events=200_000,
            corrections=10_000,
            plain_seconds=10.0,
            corrected_seconds=corrected_seconds,
        )

    lines = corrections_lines([run(10.5), run(12.5), run(10.0)])
    assert "10,000 corrections mixed into the backlog and without, 3 rounds" in lines[0]
    assert lines[1] == "  without      20,000 (20,000-20,000) events/s"
    assert lines[2] == (
        "  with         19,048 (16,000-20,000) events/s (events only), "
        "20,000 (16,800-21,000) records/s"
    )
    assert lines[3] == "  with/without 0.952 (0.800-1.000)   target >= 0.9: met"
    slow = corrections_lines([run(12.5), run(12.0), run(10.0)])
    assert slow[3] == "  with/without 0.833 (0.800-1.000)   target >= 0.9: MISSED"
    assert "1 round (median" in corrections_lines([run(10.0)])[0]
