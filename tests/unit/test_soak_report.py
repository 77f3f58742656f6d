"""The soak report's pure parts (rates, lag, alert latency, the markdown) and its chart."""

from __future__ import annotations

import struct
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from llm_usage.soak.ledger import Ledger, SentEvent
from llm_usage.soak.report import (
    AlertLatency,
    Stall,
    alert_latencies,
    lag_peaks,
    latency_summary,
    rate_figures,
    rates,
    recoveries,
    render_chart,
    render_markdown,
    stalls,
    summary_lines,
    under_fault,
    write_report,
)
from llm_usage.soak.timeline import AlertArrival, CheckReport, CheckRow, FaultMark, Sample

RUN_START = 1_000.0
SAMPLES = [
    Sample(0.0, 0, 0, 0, 0),
    Sample(1.0, 2000, 2000, 1500, 1000),
    Sample(2.0, 4000, None, None, 2500),  # a broker was down: the cluster did not answer
    Sample(3.0, 6000, 6000, 5900, 6000),
]
FAULTS = [
    FaultMark(1.5, "broker_restart", "broker-2 (leader of 3 partitions)", "back after 9.1 s"),
    FaultMark(2.5, "sigkill", "usage-1"),
]
PASSING = CheckReport(
    (
        CheckRow("events stored once, with their values", "2 events", "2 rows: 0 missing", True),
        CheckRow("alerts exactly once", "1", "1", True),
    )
)
FAILING = CheckReport(
    (
        CheckRow("events stored once, with their values", "2 events", "2 rows: 0 missing", True),
        CheckRow("alerts exactly once", "3", "2", False, "missing a|b"),
    )
)


def sent_event(request_id: str, acked_at: float) -> SentEvent:
    return SentEvent(
        request_id, "t", None, None, None, Decimal(1), 1, 1, datetime.now(UTC), acked_at
    )


def ledger_of(**acked_at: float) -> Ledger:
    ledger = Ledger(sent=Counter({"event": 5, "duplicate": 2, "retried_send": 3}))
    for request_id, at in acked_at.items():
        ledger.record_event(sent_event(request_id, at))
    return ledger


def test_rates_per_interval_leave_gaps_where_the_cluster_did_not_answer() -> None:
    series = rates(SAMPLES)
    assert series["published"] == [(1.0, 2000.0), (2.0, 2000.0), (3.0, 2000.0)]
    assert series["usage consumers"] == [(1.0, 1500.0), (2.0, None), (3.0, None)]
    assert series["budget consumers"] == [(1.0, 1000.0), (2.0, 1500.0), (3.0, 3500.0)]


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([], []),
        ([Sample(0.0, 0, 0, 0, 0)], []),
        # Two samples at the same moment make no interval.
        ([Sample(1.0, 0, 0, 0, 0), Sample(1.0, 5, 5, 5, 5)], []),
        # Half a second: the rate is per second.
        ([Sample(0.0, 0, 0, 0, 0), Sample(0.5, 100, 100, 100, 100)], [(0.5, 200.0)]),
    ],
)
def test_rates_of_degenerate_timelines(
    samples: list[Sample], expected: list[tuple[float, float]]
) -> None:
    assert rates(samples)["published"] == expected


def test_rate_figures_average_over_the_load_and_peak_over_the_run() -> None:
    # The drain after 3 s has no new records and would halve the average if it counted.
    drained = [*SAMPLES, Sample(6.0, 6000, 6000, 6000, 6000)]
    figures = rate_figures(drained, load_seconds=3.0)
    assert figures["published"].average == 2000.0
    assert figures["budget consumers"].peak == 3500.0
    assert figures["budget consumers"].peak_at == 3.0
    # Known values at 0, 1 and 3 s: the gap at 2 s does not stop the average.
    assert figures["usage consumers"].average == pytest.approx(5900 / 3)
    empty = rate_figures([], load_seconds=3.0)["published"]
    assert (empty.average, empty.peak, empty.peak_at) == (None, None, None)


def test_lag_peaks_are_per_group_at_the_first_moment_of_the_peak() -> None:
    samples = [*SAMPLES, Sample(4.0, 7000, 7000, 6500, 6000)]
    assert lag_peaks(samples) == {"usage": (500, 1.0), "budget": (1000, 1.0)}
    assert lag_peaks([Sample(0.0, 0, None, None, None)]) == {}


@pytest.mark.parametrize(
    ("latencies", "expected"),
    [
        ([0.4], AlertLatency(1, 0.4, 0.4, 0.4)),
        ([5.0, 0.1, 0.2], AlertLatency(3, 0.2, 5.0, 5.0)),
        ([1.0, 2.0], AlertLatency(2, 1.0, 2.0, 2.0)),
        # Nearest rank: of 1..100 the p99 is the 99th, not the max.
        ([float(i) for i in range(100, 0, -1)], AlertLatency(100, 50.0, 99.0, 100.0)),
        ([float(i) for i in range(1, 201)], AlertLatency(200, 100.0, 198.0, 200.0)),
    ],
)
def test_latency_percentiles_are_nearest_rank(
    latencies: list[float], expected: AlertLatency
) -> None:
    assert latency_summary(latencies) == expected


def test_no_latencies_no_summary() -> None:
    assert latency_summary([]) is None


def test_latency_runs_from_the_triggering_events_acknowledgement() -> None:
    ledger = ledger_of(e1=100.0, e2=200.0)
    alerts = [
        AlertArrival("a1", "e1", 100.4),
        AlertArrival("a2", None, 105.0),  # no triggering event: no latency
        AlertArrival("a3", "not-sent", 105.0),
        AlertArrival("a4", "e2", 199.99),  # read before the commit returned to the generator
    ]
    assert [(at, round(latency, 3)) for at, latency in alert_latencies(alerts, ledger)] == [
        (100.0, 0.4),
        (200.0, 0.0),
    ]


@pytest.mark.parametrize(
    ("fault_t", "acked_at", "selected"),
    [
        (5.0, 1_005.0, True),  # at the fault
        (5.0, 1_035.0, True),  # at the end of the window
        (5.0, 1_035.1, False),  # after it
        (5.0, 1_004.9, False),  # before the fault
    ],
)
def test_under_fault_takes_events_acknowledged_within_the_window_after_a_fault(
    fault_t: float, acked_at: float, selected: bool
) -> None:
    found = under_fault(
        [(acked_at, 0.7)], [FaultMark(fault_t, "sigkill", "x")], run_start=RUN_START
    )
    assert found == ([0.7] if selected else [])


def test_under_fault_with_no_faults_is_empty() -> None:
    assert under_fault([(1_005.0, 0.7)], [], run_start=RUN_START) == []


def markdown(check: CheckReport) -> str:
    ledger = ledger_of(e1=RUN_START + 1.6)
    return render_markdown(
        title="Soak, seed 7, 3 s at 2000 events/s",
        plan_lines=[
            "seed 7, 3 s of load, 2 faults",
            "replay: llm-usage soak --seed 7 --seconds 3",
            "t=    1.5 s  broker_restart   leader of usage partition 1 for 9.1 s",
        ],
        samples=SAMPLES,
        faults=FAULTS,
        alerts=[AlertArrival("a1", "e1", RUN_START + 2.1)],
        ledger=ledger,
        check=check,
        chart_name="soak.png",
        duration_s=3.0,
        run_start=RUN_START,
    )


def test_markdown_of_a_passing_run() -> None:
    text = markdown(PASSING)
    lines = text.splitlines()
    assert lines[0] == "# PASSED: Soak, seed 7, 3 s at 2000 events/s"
    assert "FAILED" not in text
    # The seed and the replay command come before the figures; the planned faults at the end.
    replay = lines.index("replay: llm-usage soak --seed 7 --seconds 3")
    planned = lines.index("t=    1.5 s  broker_restart   leader of usage partition 1 for 9.1 s")
    assert replay < lines.index("## Figures") < lines.index("## Faults") < planned
    assert "| event | 5 |" in lines
    assert "| **all kinds** | **7** |" in lines  # a retried send is not a record
    assert "- events stored: 2 rows: 0 missing" in lines
    assert "| published | 2,000 | 2,000 at t=1 s |" in lines
    assert "| broker_restart | 1 |" in lines
    assert "| usage | 500 | t=1 s |" in lines
    assert "- all alerts: 1 alerts, p50 0.50 s, p99 0.50 s, max 0.50 s" in lines
    assert "- triggered within 30 s after a fault: 1 alerts, p50 0.50 s" in text
    assert "![events/s and consumer lag" in text
    assert "](soak.png)" in text
    # Recovery: these samples carry no per-partition offsets, so no stall is seen.
    assert (
        "| 1.5 | broker_restart | broker-2 (leader of 3 partitions) | back after 9.1 s | 0 | 0 "
        "| 0.50 / 0.50 s (1) |" in lines
    )
    assert "| 2.5 | sigkill | usage-1 |  | 0 | 0 | - |" in lines


def test_markdown_of_a_failing_run_says_so_first_and_shows_the_failing_row() -> None:
    text = markdown(FAILING)
    lines = text.splitlines()
    assert lines[0].startswith("# FAILED: ")
    assert "1 of 2 checks did not hold (alerts exactly once)" in text
    # A pipe in a detail stays inside its cell.
    assert "| alerts exactly once | 3 | 2 | **NO** | missing a\\|b |" in lines
    passed_row = "| events stored once, with their values | 2 events | 2 rows: 0 missing | yes |  |"
    assert passed_row in lines


def test_a_checker_without_rows_is_a_failure() -> None:
    assert markdown(CheckReport(())).startswith("# FAILED: ")


def test_summary_lines_give_the_verdict_and_only_the_failing_rows() -> None:
    def summary(check: CheckReport) -> list[str]:
        return summary_lines(
            samples=SAMPLES,
            faults=FAULTS,
            alerts=[],
            ledger=ledger_of(),
            check=check,
            run_start=RUN_START,
        )

    failing = summary(FAILING)
    assert failing[0].startswith("FAILED")
    assert failing[-1] == "  FAIL alerts exactly once: expected 3, found 2 (missing a|b)"
    assert not any("events stored" in line for line in failing)
    assert "faults: broker_restart 1, sigkill 1" in failing
    assert "alert latency: no alerts" in failing
    passing = summary(PASSING)
    assert passing[0] == "PASSED: all 2 checks held"
    assert not any("FAIL" in line for line in passing)


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


def test_write_report_draws_the_chart_beside_the_markdown(tmp_path: Path) -> None:
    samples = [
        Sample(float(t), 2000 * t, 2000 * t, 2000 * t - (t % 7) * 300, 2000 * t - (t % 5) * 200)
        for t in range(120)
    ]
    faults = [
        *FAULTS,
        FaultMark(40.0, "sigstop", "budget-1", "resumed after 17 s"),
        FaultMark(60.0, "postgres_restart", "postgres"),
        FaultMark(80.0, "policy_lowered", "tenant t-3 monthly to 12.00 USD"),
        FaultMark(90.0, "unplanned_exit", "rollup-2", "exit code 1"),
    ]
    path = write_report(
        tmp_path / "report",
        title="t",
        plan_lines=["seed 1"],
        samples=samples,
        faults=faults,
        alerts=[],
        ledger=Ledger(),
        check=PASSING,
        run_start=RUN_START,
        duration_s=120.0,
    )
    assert path == tmp_path / "report" / "report.md"
    assert path.read_text(encoding="utf-8").startswith("# PASSED: t\n")
    chart = (tmp_path / "report" / "soak.png").read_bytes()
    assert png_size(chart) == (1200, 700)
    assert 20_000 < len(chart) < 2_000_000


@pytest.mark.parametrize(
    ("samples", "faults"),
    [([], []), ([], FAULTS), (SAMPLES, []), ([Sample(0.0, 0, None, None, None)], [])],
    ids=["nothing", "faults only", "samples only", "one sample, all gaps"],
)
def test_a_run_with_nothing_to_draw_still_renders(
    tmp_path: Path, samples: list[Sample], faults: list[FaultMark]
) -> None:
    render_chart(tmp_path / "chart.png", samples=samples, faults=faults)
    assert png_size((tmp_path / "chart.png").read_bytes()) == (1200, 700)


def partition_sample(t: float, ends: tuple[int, ...], budget: tuple[int, ...]) -> Sample:
    return Sample(
        t,
        sum(ends),
        sum(ends),
        sum(ends),
        sum(budget),
        partition_ends=ends,
        usage_partitions=ends,  # the usage group is always caught up here
        budget_partitions=budget,
    )


def test_a_stall_runs_from_the_last_move_to_the_next_and_idle_is_not_a_stall() -> None:
    samples = [
        partition_sample(0.0, (10, 10), (5, 10)),
        partition_sample(1.0, (20, 10), (15, 10)),  # partition 1 idle: its end is reached
        partition_sample(2.0, (30, 10), (15, 10)),  # partition 0 stands still from t=1
        partition_sample(3.0, (40, 10), (15, 10)),
        Sample(4.0, 0, None, None, None),  # the cluster did not answer
        partition_sample(5.0, (50, 10), (45, 10)),  # moves again
        partition_sample(6.0, (60, 20), (55, 10)),  # partition 1: records wait from t=6
        partition_sample(7.0, (70, 30), (65, 10)),
        partition_sample(8.0, (80, 40), (75, 10)),
        partition_sample(9.0, (90, 50), (85, 10)),  # ...and still wait at the end
    ]
    assert stalls(samples, "budget") == [
        Stall("budget", 0, 1.0, 5.0),
        Stall("budget", 1, 6.0, None),
    ]
    assert stalls(samples, "usage") == []


def test_recovery_per_fault_is_when_the_last_stall_in_its_window_ended() -> None:
    samples = [partition_sample(float(t), (100 * t, 100 * t), (100 * t, 100 * t)) for t in range(3)]
    # Partition 1 of the budget group stands still from t=2 to t=9 (a killed member's).
    samples += [
        partition_sample(float(t), (100 * t, 100 * t), (100 * t, 200 if t < 9 else 100 * t))
        for t in range(3, 12)
    ]
    kill = FaultMark(2.5, "sigkill", "budget-2")
    later = FaultMark(10.5, "sigterm", "usage-1")
    latencies = [(RUN_START + 3.0, 0.2), (RUN_START + 4.0, 6.5), (RUN_START + 11.0, 0.1)]
    found = recoveries(samples, [kill, later], latencies, run_start=RUN_START)
    assert [r.moving_after for r in found] == [
        {"usage": 0.0, "budget": 6.5},
        {"usage": 0.0, "budget": 0.0},
    ]
    alerts = found[0].alerts
    assert alerts is not None
    assert (alerts.count, alerts.max) == (3, 6.5)
    assert found[0].stalled == {"usage": (), "budget": (1,)}
    assert "budget 6.5 s (partitions 1 stood still)" in found[0].text()
    assert "usage never stopped" in found[1].text()


def test_a_stall_still_under_way_at_the_end_is_reported_as_such() -> None:
    samples = [partition_sample(float(t), (100 * t,), (100,)) for t in range(1, 8)]
    [recovery] = recoveries(samples, [FaultMark(1.5, "sigstop", "budget-1")], [], run_start=0.0)
    assert recovery.moving_after == {"usage": 0.0, "budget": None}
    assert "budget not before the end" in recovery.text()
    assert recovery.alerts is None
