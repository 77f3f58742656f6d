"""What the demo shows once its stream is stored: a void and an amend of two of its events,
published as `llm-usage events void|amend` publishes them and applied by both consumers, then
reconcile of the month for the run's tenants, as `llm-usage reconcile` runs it."""

from __future__ import annotations

import asyncio
import io
import textwrap
import time
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Final

import asyncpg

from llm_usage.cli.events import publish_asked_correction
from llm_usage.cli.reconcile import DEFAULT_CONFIRM_SECONDS, DriftFoundError, print_report
from llm_usage.core.clock import worker_clock
from llm_usage.core.errors import PipelineError
from llm_usage.core.settings import Settings
from llm_usage.domain.corrections import Action
from llm_usage.domain.periods import current_period
from llm_usage.local.demo import DemoRun, consume_until_idle, heading
from llm_usage.local.demo_budgets import DEMO_ACTOR
from llm_usage.rollup.reconcile import ReconcileReport, reconcile
from llm_usage.schemas.correction_request import CorrectionAsked
from llm_usage.storage.budget_corrections import applied_to_events
from llm_usage.storage.event_history import EventHistory, event_history
from llm_usage.storage.pool import create_pool
from llm_usage.storage.usage_event_pages import StoredUsageEvent

# How long both consumers may take to apply the demo's corrections (they take seconds).
APPLY_SECONDS: Final = 60.0
_POLL_SECONDS: Final = 0.2
# The amend's story: the gateway charged twice the agreed rate.
_AMEND_DIVISOR: Final = 2


class CorrectionsNotAppliedError(PipelineError):
    """The consumers did not apply the demo's corrections in time: exit 1."""


@dataclass(frozen=True)
class _Published:
    event: StoredUsageEvent
    correction_id: str
    action: str


def show_corrections(run: DemoRun) -> DemoRun:
    """Void one event of the run's last tenant and amend another's charge, wait until both
    consumers applied them, and print each event's charge before and after; the run with its
    events as they count now (the voided one left out, the amended one's new charge)."""
    heading("Corrections (as `llm-usage events void|amend` publishes them)")
    first, second = [event for event in run.events if event["tenant_id"] == run.tenants[-1]][:2]
    charge = Decimal(second["customer_charge_usd"]) / _AMEND_DIVISOR
    asked = [
        (first, Action.VOID, {}, "demo: the gateway billed a request that failed"),
        (
            second,
            Action.AMEND,
            {"customer_charge_usd": str(charge)},
            "demo: charged at twice the agreed rate",
        ),
    ]
    published = asyncio.run(_publish(run.settings, asked))
    histories = asyncio.run(_apply(run.settings, published))
    for (*_, reason), each, history in zip(asked, published, histories, strict=True):
        after = "0 (voided)" if history.voided else str(history.effective.customer_charge_usd)
        print(
            f"  {each.action:<6} {each.event.gateway_request_id}  {each.event.tenant_id}  "
            f"charge {history.event.customer_charge_usd} -> {after}  {reason!r}"
        )
    print(
        f"  By {DEMO_ACTOR!r}; applied by `consume usage`, then `consume budget`. Each original\n"
        "  row stays in llm_usage_events as stored, its corrections kept beside it\n"
        "  (`llm-usage events show --id ID --tenant TENANT` shows them)."
    )
    events = [
        event if event is not second else {**event, "customer_charge_usd": str(charge)}
        for event in run.events
        if event is not first
    ]
    return replace(run, events=events)


async def _publish(
    settings: Settings, asked: list[tuple[dict[str, Any], Action, dict[str, Any], str]]
) -> list[_Published]:
    now = worker_clock()()
    published = []
    for event, action, changes, reason in asked:
        correction_id = f"{event['gateway_request_id']}-{action}"
        stored, _ = await publish_asked_correction(
            settings,
            CorrectionAsked(
                action=action,
                changes=changes,
                reason=reason,
                actor=DEMO_ACTOR,
                occurred_at=now,
                correction_id=correction_id,
            ),
            tenant_id=event["tenant_id"],
            gateway_request_id=event["gateway_request_id"],
            hint=None,
            now=now,
        )
        published.append(_Published(stored, correction_id, action))
    return published


async def _apply(settings: Settings, published: list[_Published]) -> list[EventHistory]:
    """Run the usage consumer until idle and, once it has applied every correction, the budget
    consumer (it applies a correction only after the usage consumer's verdict); poll the
    database meanwhile, for at most APPLY_SECONDS in all; each event's history."""
    deadline = time.monotonic() + APPLY_SECONDS
    pool = await create_pool(settings.database_url, size=1)
    consumers = [asyncio.create_task(consume_until_idle(settings, "usage"))]
    try:
        await _applied(pool, published, consumers[-1], deadline, by_budget=False)
        consumers.append(asyncio.create_task(consume_until_idle(settings, "budget")))
        return await _applied(pool, published, consumers[-1], deadline, by_budget=True)
    finally:
        await pool.close()
        for code in [await each for each in consumers]:
            if code != 0:
                raise SystemExit(code)


async def _applied(
    pool: asyncpg.Pool,
    published: list[_Published],
    consumer: asyncio.Task[int],
    deadline: float,
    *,
    by_budget: bool,
) -> list[EventHistory]:
    """Poll until the usage consumer (`by_budget`: and the budget consumer) applied every
    correction; CorrectionsNotAppliedError once `consumer` ended or the deadline passed."""
    keys = [(each.event.tenant_id, each.event.gateway_request_id) for each in published]
    while True:
        ended = consumer.done()
        async with pool.acquire() as connection:
            histories = [await event_history(connection, each.event) for each in published]
            counted = await applied_to_events(connection, keys) if by_budget else set()
        waiting = []
        for each, history in zip(published, histories, strict=True):
            states = [f"usage consumer: {_verdict(history, each.correction_id)}"]
            if by_budget:
                applied = (each.event.tenant_id, each.correction_id) in counted
                states.append(f"budget consumer: {'applied' if applied else 'not yet'}")
            if any(not state.endswith(": applied") for state in states):
                waiting.append(f"{each.correction_id} ({', '.join(states)})")
        if not waiting:
            return histories
        if ended or time.monotonic() > deadline:
            raise CorrectionsNotAppliedError(
                f"the consumers did not apply the demo's corrections within {APPLY_SECONDS:g} s: "
                + "; ".join(waiting)
            )
        await asyncio.sleep(_POLL_SECONDS)


def _verdict(history: EventHistory, correction_id: str) -> str:
    """The usage consumer's verdict on the correction, or `not yet`."""
    verdicts = [each.verdict for each in history.corrections if each.correction_id == correction_id]
    return verdicts[0] if verdicts else "not yet"


def show_reconcile(run: DemoRun) -> None:
    """Reconcile the run's month for each of its tenants, as `llm-usage reconcile --tenant`
    does, and print the outcome; DriftFoundError (exit 1) after the drifts if there are any."""
    period = current_period(run.now)
    heading(
        f"Reconcile (`llm-usage reconcile --period {period} --tenant ID`, for each demo tenant)"
    )
    report = asyncio.run(_reconcile(run.settings, period, run.tenants))
    out = io.StringIO()
    print_report(report, as_json=False, out=out)
    print(textwrap.indent(out.getvalue(), "  "), end="")
    if report.drifts:
        raise DriftFoundError(f"{len(report.drifts)} drift(s) in {period}, listed above")
    print(
        "  Every aggregate, budget counter, invoice line and alert of the run matches its events "
        "and corrections."
    )


async def _reconcile(settings: Settings, period: str, tenants: list[str]) -> ReconcileReport:
    pool = await create_pool(settings.database_url, size=1)
    try:
        now = worker_clock()()
        reports = [
            await reconcile(
                pool,
                settings,
                periods=[period],
                tenant_id=tenant,
                confirm_seconds=DEFAULT_CONFIRM_SECONDS,
                now=now,
            )
            for tenant in tenants
        ]
    finally:
        await pool.close()
    return ReconcileReport(
        [period],
        [drift for report in reports for drift in report.drifts],
        sum(report.events for report in reports),
        sum(report.seconds for report in reports),
        max(report.confirmed_after_seconds for report in reports),
    )
