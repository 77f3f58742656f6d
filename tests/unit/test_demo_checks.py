"""The demo's corrections and reconcile sections: corrections the consumers did not apply, and
a drift, each end the demo with exit 1."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from types import SimpleNamespace
from typing import cast

import asyncpg
import pytest

from llm_usage.cli import demo_corrections
from llm_usage.cli.main import run
from llm_usage.cli.reconcile import DriftFoundError
from llm_usage.core.settings import Settings
from llm_usage.domain.periods import current_period
from llm_usage.domain.reconcile import Drift, DriftKind
from llm_usage.local.demo import DemoRun
from llm_usage.rollup.reconcile import ReconcileReport
from llm_usage.storage.usage_event_pages import StoredUsageEvent
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


class _Pool:
    """`acquire()` as asyncpg's pool answers it; the connection is never used."""

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[object]:
        yield object()


async def _consumer_ended() -> int:
    return 0


@pytest.mark.parametrize(
    ("verdict", "by_budget", "budget_applied", "waiting"),
    [
        (None, False, False, "usage consumer: not yet"),
        ("unknown", False, False, "usage consumer: unknown"),
        ("applied", True, False, "usage consumer: applied, budget consumer: not yet"),
    ],
)
async def test_corrections_not_applied_once_the_consumer_ended_stop_the_demo(
    monkeypatch: pytest.MonkeyPatch,
    verdict: str | None,
    by_budget: bool,
    budget_applied: bool,
    waiting: str,
) -> None:
    event = cast(StoredUsageEvent, SimpleNamespace(tenant_id="t", gateway_request_id="e"))
    entries = [] if verdict is None else [SimpleNamespace(correction_id="c", verdict=verdict)]

    async def history(_connection: object, _event: object) -> object:
        return SimpleNamespace(corrections=entries)

    async def counted(_connection: object, _keys: object) -> set[tuple[str, str]]:
        return {("t", "c")} if budget_applied else set()

    monkeypatch.setattr(demo_corrections, "event_history", history)
    monkeypatch.setattr(demo_corrections, "applied_to_events", counted)
    consumer = asyncio.create_task(_consumer_ended())
    await consumer
    published = [demo_corrections._Published(event, "c", "void")]

    with pytest.raises(demo_corrections.CorrectionsNotAppliedError) as raised:
        await demo_corrections._applied(
            cast(asyncpg.Pool, _Pool()),
            published,
            consumer,
            time.monotonic() + 60,
            by_budget=by_budget,
        )
    assert str(raised.value).endswith(f"c ({waiting})")

    entries = [SimpleNamespace(correction_id="c", verdict="applied")]
    budget_applied = True
    assert await demo_corrections._applied(
        cast(asyncpg.Pool, _Pool()), published, consumer, time.monotonic(), by_budget=by_budget
    ) == [SimpleNamespace(corrections=entries)]
