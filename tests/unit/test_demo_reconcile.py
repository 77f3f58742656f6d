"""The demo's reconcile section: a drift is printed and ends the demo with exit 1."""

from __future__ import annotations

from decimal import Decimal

import pytest

from llm_usage.cli import demo_corrections
from llm_usage.cli.main import run
from llm_usage.cli.reconcile import DriftFoundError
from llm_usage.core.settings import Settings
from llm_usage.domain.periods import current_period
from llm_usage.domain.reconcile import Drift, DriftKind
from llm_usage.local.demo import DemoRun
from llm_usage.rollup.reconcile import ReconcileReport
from tests import clock

TENANTS = ["acme-0", "globex-0", "initech-0"]


def _demo_run() -> DemoRun:
    return DemoRun(settings=Settings(), tenants=TENANTS, now=clock.now(), events=[], alerts=[])


def _with_reports(monkeypatch: pytest.MonkeyPatch, drifts: list[Drift]) -> list[tuple[str, ...]]:
    """Reconcile answers `drifts` (and 42 events) without a database; the calls it gets."""
    calls: list[tuple[str, ...]] = []

    async def fake(_settings: Settings, period: str, tenants: list[str]) -> ReconcileReport:
        calls.append((period, *tenants))
        return ReconcileReport([period], drifts, 42, 0.5, 0.0)

    monkeypatch.setattr(demo_corrections, "_reconcile", fake)
    return calls


def test_no_drift_prints_the_summary_for_the_runs_tenants_and_month(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = _with_reports(monkeypatch, [])

    demo_corrections.show_reconcile(_demo_run())

    period = current_period(clock.now())
    assert calls == [(period, *TENANTS)]
    out = capsys.readouterr().out
    assert f"  reconcile {period}: 0 drift(s); 42 events in 0.5 s" in out
    assert "matches its events and corrections" in out


def test_a_drift_is_printed_and_stops_the_demo_with_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    drift = Drift(
        DriftKind.BUDGET_COUNTER,
        (("tenant_id", "acme-0"), ("scope", "tenant")),
        Decimal("1.00"),
        Decimal("1.01"),
        Decimal("0.01"),
    )
    _with_reports(monkeypatch, [drift])

    with pytest.raises(DriftFoundError, match=r"1 drift\(s\)"):
        demo_corrections.show_reconcile(_demo_run())

    out = capsys.readouterr().out
    assert f"  {drift.text()}\n" in out
    assert "1 drift(s) (budget_counter 1)" in out
    assert "matches its events and corrections" not in out


def test_the_demo_command_exits_1_on_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    def drifted(_run: DemoRun) -> None:
        raise DriftFoundError("1 drift(s), listed above")

    monkeypatch.setattr("llm_usage.local.demo.run_demo", _demo_run)
    monkeypatch.setattr(demo_corrections, "show_corrections", lambda run: run)
    monkeypatch.setattr("llm_usage.cli.demo_page.show_invoice_lines", lambda _run: None)
    monkeypatch.setattr(demo_corrections, "show_reconcile", drifted)

    assert run(["demo"]) == 1
