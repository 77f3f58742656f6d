from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from llm_usage.cli.soak.ledger import Ledger, SentEvent
from llm_usage.cli.soak.report import (
    alert_latencies,
    lag_peaks,
    latency_summary,
    rates,
    render_chart,
    summary_lines,
    under_fault,
    write_report,
)
from llm_usage.cli.soak.timeline import AlertArrival, CheckReport, CheckRow, FaultMark, Sample

SAMPLES = [
    Sample(0.0, 0, 0, 0, 0),
    Sample(1.0, 2000, 2000, 1500, 1000),
    Sample(2.0, 4000, None, None, 2500),  # a broker was down
    Sample(3.0, 6000, 6000, 5900, 6000),
]
FAULTS = [FaultMark(1.5, "broker_restart", "broker 2"), FaultMark(2.5, "sigkill", "usage-1")]


def ledger_with(request_id: str, acked_at: float) -> Ledger:
    ledger = Ledger()
    ledger.record_event(
        SentEvent(request_id, "t", None, None, None, Decimal(1), 1, 1, datetime.now(UTC), acked_at)
    )
    return ledger


def test_rates_leave_gaps_where_the_cluster_did_not_answer() -> None:
    series = rates(SAMPLES)
    assert series["published"] == [(1.0, 2000.0), (2.0, 2000.0), (3.0, 2000.0)]
    assert series["usage consumers"] == [(1.0, 1500.0), (2.0, None), (3.0, None)]


def test_lag_peaks_per_group() -> None:
    assert lag_peaks(SAMPLES) == {"usage": (500, 1.0), "budget": (1000, 1.0)}


def test_latency_from_the_triggering_events_acknowledgement_and_under_fault() -> None:
    ledger = ledger_with("e1", 100.0)
    alerts = [AlertArrival("a1", "e1", 100.4), AlertArrival("a2", None, 105.0)]
    latencies = alert_latencies(alerts, ledger)
    assert [round(latency, 3) for _, latency in latencies] == [0.4]
    summary = latency_summary([0.1, 0.2, 5.0])
    assert summary is not None
    assert (summary.p50, summary.max) == (0.2, 5.0)
    assert latency_summary([]) is None
    assert under_fault(latencies, [FaultMark(95.0 - 90.0, "sigkill", "x")], run_start=90.0) == [
        latencies[0][1]
    ]
    assert under_fault(latencies, [FaultMark(50.0, "sigkill", "x")], run_start=90.0) == []


def test_the_report_says_passed_or_failed_and_draws_the_chart(tmp_path: Path) -> None:
    failing = CheckReport((CheckRow("alerts", "3", "2", False, "missing x"),))
    lines = summary_lines(
        samples=SAMPLES, faults=FAULTS, alerts=[], ledger=Ledger(), check=failing, run_start=0.0
    )
    assert lines[0].startswith("FAILED")
    assert any("FAIL alerts" in line for line in lines)
    path = write_report(
        tmp_path,
        title="t",
        plan_lines=["seed 1"],
        samples=SAMPLES,
        faults=FAULTS,
        alerts=[],
        ledger=Ledger(),
        check=CheckReport((CheckRow("alerts", "3", "3", True),)),
        run_start=0.0,
        duration_s=3.0,
    )
    text = path.read_text()
    assert "**PASSED" in text
    assert "| 2.5 | sigkill | usage-1 |" in text
    chart = (tmp_path / "soak.png").read_bytes()
    assert chart.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(chart) > 10_000


def test_a_run_without_samples_or_faults_still_draws(tmp_path: Path) -> None:
    render_chart(tmp_path / "empty.png", samples=[], faults=[])
    assert (tmp_path / "empty.png").stat().st_size > 0
