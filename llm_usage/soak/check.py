"""The soak's checker: what the gateway sent against what the pipeline made of it, exactly.

Each comparison is a pure function over plain rows; `check_soak` only fetches them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeAlias

import asyncpg
from aiokafka import ConsumerRecord

from llm_usage.core.clock import SimulatedClock
from llm_usage.core.settings import Settings
from llm_usage.domain.budgets import (
    AlertLevel,
    BudgetWindow,
    ScopeType,
    alert_id_for,
    period_start,
    threshold_usd,
)
from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.domain.reconcile import DriftKind
from llm_usage.rollup.reconcile import ReconcileReport, reconcile
from llm_usage.rollup.run import run_rollup
from llm_usage.schemas.dead_letter import REASON_HEADER
from llm_usage.soak.ledger import Ledger, SentEvent, value_digest
from llm_usage.soak.timeline import CheckReport, CheckRow
from llm_usage.testing.topics import read_to_end

# (tenant, scope_type, scope_id, window, period_start)
SpendKey: TypeAlias = tuple[str, str, str, str, date]
_SHOW = 5


def _row(name: str, expected: str, found: str, problems: Sequence[str]) -> CheckRow:
    return CheckRow(name, expected, found, not problems, "; ".join(problems[:_SHOW]))


def compare_stored(ledger: Ledger, stored: Mapping[str, SentEvent], rows: int) -> CheckRow:
    """Every acknowledged event stored once with its first version's values; nothing else."""
    missing = sorted(set(ledger.events) - set(stored))
    extra = sorted(set(stored) - set(ledger.events))
    changed = sorted(
        request_id
        for request_id, event in ledger.events.items()
        if request_id in stored and _values(stored[request_id]) != _values(event)
    )
    problems = [f"missing {i}" for i in missing] + [f"not sent {i}" for i in extra]
    problems += [f"other values {i}" for i in changed]
    if rows != len(stored):
        problems.append(f"{rows} rows for {len(stored)} ids")
    return _row(
        "events stored once, with their values",
        f"{len(ledger.events)} events",
        f"{rows} rows: {len(missing)} missing, {len(extra)} extra, {len(changed)} changed",
        problems,
    )


def _values(event: SentEvent) -> tuple[Any, ...]:
    return (
        event.tenant_id,
        event.deployment_id,
        event.user_id,
        event.agent_id,
        event.customer_charge_usd,
        event.input_tokens,
        event.output_tokens,
        event.occurred_at,
    )


def compare_aborted(aborted: set[str], stored: Iterable[str], counted: Iterable[str]) -> CheckRow:
    leaked = sorted(aborted & (set(stored) | set(counted)))
    return _row(
        "nothing of an aborted transaction stored or counted",
        f"0 of {len(aborted)} aborted ids",
        f"{len(leaked)}",
        [f"aborted but kept {i}" for i in leaked],
    )


def compare_dead_letters(ledger: Ledger, records: Sequence[tuple[str, str]]) -> CheckRow:
    """`records`: (value digest, dlq.reason) of every DLQ record. Each deserved its reason and
    every record that deserved one is there (copies after a crash are at-least-once: allowed)."""
    problems = [
        f"{digest[:12]} got {reason}, deserved {ledger.dead_letters.get(digest, 'none')}"
        for digest, reason in records
        if ledger.dead_letters.get(digest) != reason
    ]
    seen = {digest for digest, _ in records}
    problems += [f"no dead letter for {d[:12]}" for d in sorted(set(ledger.dead_letters) - seen)]
    copies = len(records) - len(seen)
    return _row(
        "dead letters deserved, none missing",
        f"{len(ledger.dead_letters)} records ({_by_reason(ledger.dead_letters.values())})",
        f"{len(records)} records, {copies} extra copies",
        problems,
    )


def _by_reason(reasons: Iterable[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(Counter(reasons).items()))


def spend_from_events(events: Iterable[SentEvent]) -> dict[SpendKey, Decimal]:
    """The contract's spend per scope and period, from raw events."""
    sums: dict[SpendKey, Decimal] = defaultdict(Decimal)
    for event in events:
        scopes = [("tenant", event.tenant_id)]
        scopes += [
            (scope, value)
            for scope, value in (
                ("deployment", event.deployment_id),
                ("user", event.user_id),
                ("agent", event.agent_id),
            )
            if value is not None
        ]
        for window in BudgetWindow:
            start = period_start(window, event.occurred_at)
            for scope, scope_id in scopes:
                key = (event.tenant_id, scope, scope_id, window.value, start)
                sums[key] = EXACT_CONTEXT.add(sums[key], event.customer_charge_usd)
    return dict(sums)


class PolicyVersion:
    """One policy as it was set: its limits, and the simulated time it was set."""

    def __init__(self, scope: tuple[str, str, str], policy: Mapping[str, Any], set_at: datetime):
        self.scope = scope
        self.pct = int(policy["warn_threshold_pct"])
        self.limits = {
            window: Decimal(policy[f"{window.value}_limit_usd"])
            for window in BudgetWindow
            if policy.get(f"{window.value}_limit_usd") is not None
        }
        self.set_at = set_at


def expected_alerts(
    spend: Mapping[SpendKey, Decimal],
    history: Mapping[tuple[str, str, str], Sequence[PolicyVersion | None]],
) -> tuple[set[str], set[str]]:
    """(alert ids expected, alert ids forbidden).

    The last version of each policy (None: deleted) expects, for every period of its scope that
    starts on or after the period holding the moment it was set, `warning` iff spend >= limit *
    pct / 100 and `exceeded` iff spend >= limit. Earlier periods and superseded limits expect
    nothing: the soak makes superseded limits unreachable and sends nothing to periods before a
    policy was set, so an alert there is one too many.
    """
    expected: set[str] = set()
    forbidden: set[str] = set()
    periods: dict[tuple[str, str, str, str], list[tuple[date, Decimal]]] = defaultdict(list)
    for (tenant, scope, scope_id, window, start), amount in spend.items():
        periods[(tenant, scope, scope_id, window)].append((start, amount))
    for scope_key, versions in history.items():
        for index, version in enumerate(versions):
            if version is None:
                continue
            last = index == len(versions) - 1
            for window, limit in version.limits.items():
                first = period_start(window, version.set_at)
                for start, amount in periods.get((*scope_key, window.value), []):
                    for level in AlertLevel:
                        alert = alert_id_for(
                            tenant_id=scope_key[0],
                            scope_type=ScopeType(scope_key[1]),
                            scope_id=scope_key[2],
                            window=window,
                            period_start=start,
                            level=level,
                            limit_usd=limit,
                        )
                        reached = amount >= threshold_usd(level, limit, version.pct)
                        if last and start >= first and reached:
                            expected.add(alert)
                        else:
                            forbidden.add(alert)
    return expected, forbidden - expected


def compare_alerts(
    expected: set[str], forbidden: set[str], arrived: Sequence[Mapping[str, Any]]
) -> CheckRow:
    counts = Counter(str(alert.get("alert_id")) for alert in arrived)
    twice = sorted(i for i, n in counts.items() if n > 1)
    missing = sorted(expected - set(counts))
    extra = sorted(set(counts) - expected)
    problems = [f"twice {i}" for i in twice] + [f"missing {i}" for i in missing]
    problems += [f"{'forbidden' if i in forbidden else 'unexpected'} {i}" for i in extra]
    for alert in arrived:
        threshold = EXACT_CONTEXT.multiply(
            Decimal(alert["limit_usd"]), EXACT_CONTEXT.divide(Decimal(alert["threshold_pct"]), 100)
        )
        if Decimal(alert["spend_usd"]) < threshold:
            problems.append(f"spend below threshold in {alert['alert_id']}")
    levels = Counter(str(alert.get("level")) for alert in arrived)
    return _row(
        "alerts: exactly the expected set, each once",
        f"{len(expected)} alerts",
        f"{len(arrived)} on the topic ({_by_reason(levels.elements())}), "
        f"{len(twice)} twice, {len(missing)} missing, {len(extra)} unexpected",
        problems,
    )


# What reconcile checks, shown as two of the checker's rows.
_INVOICE_KINDS = frozenset({DriftKind.INVOICE_TOTAL})


def reconcile_rows(report: ReconcileReport, closed: set[str]) -> tuple[CheckRow, CheckRow]:
    """Reconcile's drifts as the checker's rows: everything derived from the raw events (usage
    aggregates, budget counters, alerts against the outbox and the topic, holds), and the closed
    months' invoices. Reconcile, not a copy of it, recomputes both."""
    derived = [d for d in report.drifts if d.kind not in _INVOICE_KINDS]
    invoices = [d for d in report.drifts if d.kind in _INVOICE_KINDS]
    problems = [] if closed else ["no month was closed during the run"]
    return (
        _row(
            "reconcile: aggregates, budget counters, alerts and holds equal the raw events",
            f"no drift over {', '.join(report.periods)} ({report.events} events)",
            f"{len(derived)} drifts",
            [d.text() for d in derived],
        ),
        _row(
            "reconcile: closed months bill round_half_up(exact total x 100)",
            f"no drift in {', '.join(sorted(closed)) or 'no month'}",
            f"{len(invoices)} drifts",
            [d.text() for d in invoices] + problems,
        ),
    )


async def check_soak(
    *,
    pool: asyncpg.Pool,
    settings: Settings,
    ledger: Ledger,
    clock: SimulatedClock,
    open_period: str,
) -> CheckReport:
    bootstrap_servers = settings.kafka_bootstrap_servers
    await run_rollup(pool, period=open_period)  # adjustments for late events of closed months
    async with pool.acquire() as connection:
        rows = await connection.fetch(
            """SELECT gateway_request_id, tenant_id, deployment_id, user_id, agent_id,
                      customer_charge_usd, input_tokens, output_tokens, occurred_at
               FROM llm_usage_events"""
        )
        counted = [
            r[0]
            for r in await connection.fetch(
                "SELECT gateway_request_id FROM usage_event_ids WHERE counted"
            )
        ]
        audit = await connection.fetch(
            "SELECT tenant_id, scope_type, scope_id, changed_at, new_policy "
            "FROM budget_policy_audit ORDER BY id"
        )
        closed = {r[0] for r in await connection.fetch("SELECT period FROM invoice_periods")}
    stored = {
        r["gateway_request_id"]: SentEvent(**{k: r[k] for k in r.keys()}, acked_at=0.0)  # noqa: SIM118
        for r in rows
    }
    history: dict[tuple[str, str, str], list[PolicyVersion | None]] = defaultdict(list)
    for entry in audit:
        scope = (entry["tenant_id"], entry["scope_type"], entry["scope_id"])
        new = entry["new_policy"]
        set_at = clock.at(entry["changed_at"].timestamp())
        history[scope].append(
            PolicyVersion(scope, json.loads(new), set_at) if new is not None else None
        )
    spend = spend_from_events(stored.values())
    expected, forbidden = expected_alerts(spend, history)
    alerts = [
        json.loads(r.value or b"{}")
        for r in await read_topic(bootstrap_servers, settings.alerts_topic)
    ]
    dead = [
        (value_digest(r.value or b""), dict(r.headers).get(REASON_HEADER, b"").decode())
        for r in await read_topic(bootstrap_servers, settings.dlq_topic)
    ]
    months = sorted({event.occurred_at.strftime("%Y-%m") for event in stored.values()})
    # The workers are stopped and drained: nothing lags, so no second read.
    report = await reconcile(pool, settings, periods=months, confirm_seconds=0, now=clock.now())
    return CheckReport(
        rows=(
            compare_stored(ledger, stored, len(rows)),
            compare_aborted(ledger.aborted_ids, stored, counted),
            compare_dead_letters(ledger, dead),
            compare_alerts(expected, forbidden, alerts),
            *reconcile_rows(report, closed),
        )
    )


async def read_topic(
    bootstrap_servers: str, topic: str, *, within: float = 120.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every committed record of `topic`, up to its end offsets when asked."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await asyncio.wait_for(read_to_end(bootstrap_servers, topic), 60)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(2.0)
