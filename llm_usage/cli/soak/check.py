"""The soak's checker: what the gateway sent against what the pipeline made of it, exactly.

Every comparison is a pure function over plain values, and each gives one row of the report;
`check_soak` only runs the rollup once, reads the topics and the tables, and hands them over.
Sums are exact (`EXACT_CONTEXT` raises rather than drop a digit), compared as decimals.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TypeAlias

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, KafkaTimeoutError, for_code
from pydantic import ValidationError

from llm_usage.cli.soak.ledger import Ledger, SentEvent, value_digest
from llm_usage.cli.soak.timeline import CheckReport, CheckRow
from llm_usage.core.clock import SimulatedClock
from llm_usage.rollup.run import run_rollup
from llm_usage.schemas.budget import (
    AlertLevel,
    BudgetAlert,
    BudgetWindow,
    ScopeType,
    SpendKey,
    alert_id_for,
    alert_threshold_pct,
    period_start,
    threshold_usd,
)
from llm_usage.schemas.budget_policy import BudgetPolicy, PolicyKey
from llm_usage.schemas.dead_letter import REASON_HEADER
from llm_usage.schemas.money import EXACT_CONTEXT, usd_to_cents
from llm_usage.storage.pool import connection_from

# Offending ids or keys shown in a failed row's detail.
_SHOW = 5
_ZERO = Decimal(0)

# Exact charges per (tenant, deployment, user, agent, UTC day): every spend counter and every
# invoice total is a sum of these, so millions of events shrink to a few thousand groups.
UsageKey: TypeAlias = tuple[str, str | None, str | None, str | None, date]
# (tenant, deployment, month YYYY-MM): what one invoice line (and its adjustments) bill.
InvoiceKey: TypeAlias = tuple[str, str | None, str]

_STORED = "events stored once, with their values"  # the report finds this row by its start
_ABORTED = "nothing of an aborted transaction stored or counted"
_DEAD_LETTERS = "dead letters deserved, none missing"
_COUNTERS = "budget counters equal the sums of raw events"
_ALERTS = "alerts: exactly the expected set, each once"
_INVOICES = "closed months: lines + adjustments = round_half_up(exact total x 100)"
_COUNTS = "records acknowledged by kind (for information)"


def _row(name: str, expected: str, found: str, problems: Sequence[str]) -> CheckRow:
    return CheckRow(name, expected, found, not problems, "; ".join(problems[:_SHOW]))


def _by_kind(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()) if n) or "none"


# --- 1. Stored once, nothing lost ---------------------------------------------------------------


def _values(event: SentEvent) -> tuple[object, ...]:
    """What must be stored as sent (exact decimal, the same instant)."""
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


@dataclass
class StoredEvents:
    """What the checker keeps of `llm_usage_events`, fed one row at a time (a long soak stores
    millions): the ids seen, the rows whose values differ from the ledger's first version, and
    the exact charges per `UsageKey`."""

    sent: Mapping[str, SentEvent]
    rows: int = 0
    ids: set[str] = field(default_factory=set)
    changed: list[str] = field(default_factory=list)
    usage: dict[UsageKey, Decimal] = field(default_factory=dict)

    def add(self, row: SentEvent) -> None:
        self.rows += 1
        self.ids.add(row.gateway_request_id)
        first = self.sent.get(row.gateway_request_id)
        if first is not None and _values(first) != _values(row):
            self.changed.append(row.gateway_request_id)
        day = row.occurred_at.astimezone(UTC).date()
        key = (row.tenant_id, row.deployment_id, row.user_id, row.agent_id, day)
        self.usage[key] = EXACT_CONTEXT.add(self.usage.get(key, _ZERO), row.customer_charge_usd)


def stored_events(sent: Mapping[str, SentEvent], rows: Iterable[SentEvent]) -> StoredEvents:
    """`StoredEvents` of rows already in hand."""
    stored = StoredEvents(sent)
    for row in rows:
        stored.add(row)
    return stored


def compare_stored(sent: Mapping[str, SentEvent], stored: StoredEvents) -> CheckRow:
    """The stored ids are exactly the acknowledged ones, each row holding its first version's
    tenant, attribution, exact charge, tokens and time, and no id stored twice."""
    missing = sorted(i for i in sent if i not in stored.ids)
    extra = sorted(i for i in stored.ids if i not in sent)
    changed = sorted(stored.changed)
    twice = stored.rows - len(stored.ids)
    problems = [f"missing {i}" for i in missing[:_SHOW]]
    problems += [f"not sent {i}" for i in extra[:_SHOW]]
    problems += [f"other values {i}" for i in changed[:_SHOW]]
    if twice:
        problems.insert(0, f"{stored.rows} rows for {len(stored.ids)} ids")
    return _row(
        _STORED,
        f"{len(sent)} events",
        f"{stored.rows} rows: {len(missing)} missing, {len(extra)} extra, {len(changed)} changed",
        problems,
    )


# --- 2. Nothing aborted stored ------------------------------------------------------------------


def compare_aborted(
    aborted: Collection[str], stored: Collection[str], counted: Collection[str]
) -> CheckRow:
    """No id sent only in an aborted transaction is stored or counted by the budget consumer."""
    kept = sorted(i for i in aborted if i in stored)
    counted_too = sorted(i for i in aborted if i in counted)
    problems = [f"stored {i}" for i in kept[:_SHOW]] + [f"counted {i}" for i in counted_too[:_SHOW]]
    return _row(
        _ABORTED,
        f"0 of {len(aborted)} aborted ids",
        f"{len(kept)} stored, {len(counted_too)} counted",
        problems,
    )


# --- 3. Dead letters deserved -------------------------------------------------------------------


def compare_dead_letters(
    deserved: Mapping[str, str], records: Sequence[tuple[str, str | None]]
) -> CheckRow:
    """`records`: (value digest, `dlq.reason`) of every DLQ record. Each deserved exactly that
    reason, and every record that deserved one is there at least once (a copy after a crash is
    at-least-once publishing, allowed and counted)."""
    undeserved = [
        f"{digest[:12]} has {reason or 'no reason'}, deserved {deserved.get(digest, 'none')}"
        for digest, reason in records
        if deserved.get(digest) != reason
    ]
    seen = {digest for digest, _ in records}
    missing = sorted(set(deserved) - seen)
    problems = undeserved[:_SHOW]
    problems += [f"no dead letter for {d[:12]} ({deserved[d]})" for d in missing[:_SHOW]]
    return _row(
        _DEAD_LETTERS,
        f"{len(deserved)} records ({_by_kind(Counter(deserved.values()))})",
        f"{len(records)} records: {len(undeserved)} not deserved, "
        f"{len(records) - len(seen)} extra copies, {len(missing)} missing",
        problems,
    )


# --- 4. Budget counters = raw sums --------------------------------------------------------------


def _scopes(
    tenant_id: str, deployment_id: str | None, user_id: str | None, agent_id: str | None
) -> list[tuple[str, str]]:
    """The contract's scopes of an event: its tenant, and each attribution that is not null."""
    scopes = [(ScopeType.TENANT.value, tenant_id)]
    for scope_type, scope_id in (
        (ScopeType.DEPLOYMENT, deployment_id),
        (ScopeType.USER, user_id),
        (ScopeType.AGENT, agent_id),
    ):
        if scope_id is not None:
            scopes.append((scope_type.value, scope_id))
    return scopes


def spend_from_usage(usage: Mapping[UsageKey, Decimal]) -> dict[SpendKey, Decimal]:
    """The contract's spend per (tenant, scope, window, period start), summed exactly from the
    stored events: daily is the UTC day of `occurred_at`, monthly the first of its UTC month."""
    spend: dict[SpendKey, Decimal] = {}
    for (tenant, deployment, user, agent, day), amount in usage.items():
        for scope_type, scope_id in _scopes(tenant, deployment, user, agent):
            for window, start in (
                (BudgetWindow.DAILY.value, day),
                (BudgetWindow.MONTHLY.value, day.replace(day=1)),
            ):
                key = (tenant, scope_type, scope_id, window, start)
                spend[key] = EXACT_CONTEXT.add(spend.get(key, _ZERO), amount)
    return spend


def compare_counters(
    expected: Mapping[SpendKey, Decimal], counters: Mapping[SpendKey, Decimal]
) -> CheckRow:
    """Every `budget_spend` row equals its exact sum, and every sum has its row."""
    keys = set(expected) | set(counters)
    wrong = sorted(key for key in keys if expected.get(key) != counters.get(key))
    return _row(
        _COUNTERS,
        f"{len(expected)} counters",
        f"{len(counters)} counters, {len(wrong)} differ",
        [
            f"{'/'.join(map(str, key))}: counter {counters.get(key)}, events {expected.get(key)}"
            for key in wrong[:_SHOW]
        ],
    )


# --- 5. Alerts exactly once, exactly the expected set -------------------------------------------


@dataclass(frozen=True)
class PolicyVersion:
    """A scope's policy as one audited change left it (None: deleted), and the simulated time
    of that change."""

    policy: BudgetPolicy | None
    set_at: datetime


def policy_history(
    audit: Iterable[tuple[PolicyKey, str | None, datetime]], clock: SimulatedClock
) -> dict[PolicyKey, list[PolicyVersion]]:
    """`audit`: (scope, new policy JSON or None, `changed_at` in real time), oldest first. Each
    change is placed on the run's simulated time, which is what the workers' periods follow."""
    history: dict[PolicyKey, list[PolicyVersion]] = {}
    for key, new_policy, changed_at in audit:
        policy = None if new_policy is None else BudgetPolicy.from_json(json.loads(new_policy))
        version = PolicyVersion(policy, clock.at(changed_at.timestamp()))
        history.setdefault(key, []).append(version)
    return history


@dataclass(frozen=True)
class ExpectedAlert:
    """An alert the final data calls for, and the `threshold_pct` it must carry."""

    level: AlertLevel
    limit_usd: Decimal
    threshold_pct: int


def expected_alerts(
    counters: Mapping[SpendKey, Decimal],
    history: Mapping[PolicyKey, Sequence[PolicyVersion]],
) -> tuple[dict[str, ExpectedAlert], dict[str, str]]:
    """The alerts the final data calls for, by id, and why each other id of the same counters
    and limits must not be on the topic.

    The rule: only the LAST version of a policy (the one in effect at the end; a deleted policy
    expects nothing) expects alerts. For each window limit L it has, with pct its warn
    percentage, and for every period P of that scope and window whose period start is on or
    after the start of the period holding the simulated moment the version was set, it expects
    `warning` iff spend(P) >= L * pct / 100 and `exceeded` iff spend(P) >= L (exact decimals,
    `threshold_usd`; spend is the final `budget_spend` row). Periods before that one and every
    superseded version expect nothing: the soak makes superseded limits unreachable and sends
    no events to periods before a policy was set, so an alert there is one too many.
    """
    periods: dict[tuple[str, str, str, str], list[tuple[date, Decimal]]] = {}
    for (tenant, scope_type, scope_id, window, start), spend in counters.items():
        periods.setdefault((tenant, scope_type, scope_id, window), []).append((start, spend))
    expected: dict[str, ExpectedAlert] = {}
    refused: dict[str, str] = {}
    for (tenant, scope_type, scope_id), versions in history.items():
        final = versions[-1].policy if versions else None
        for version in versions:
            policy = version.policy
            if policy is None:
                continue
            for window, limit in policy.limits():
                first = period_start(window, version.set_at)
                for start, spend in periods.get((tenant, scope_type, scope_id, window.value), []):
                    for level in AlertLevel:
                        alert_id = alert_id_for(
                            tenant_id=tenant,
                            scope_type=ScopeType(scope_type),
                            scope_id=scope_id,
                            window=window,
                            period_start=start,
                            level=level,
                            limit_usd=limit,
                        )
                        threshold = threshold_usd(level, limit, policy.warn_threshold_pct)
                        if policy is not final:
                            why = f"superseded limit {limit}" if final else "policy deleted"
                        elif start < first:
                            why = f"period before the policy was set ({version.set_at:%Y-%m-%d})"
                        elif spend < threshold:
                            why = f"spend {spend} below {threshold}"
                        else:
                            pct = alert_threshold_pct(level, policy.warn_threshold_pct)
                            expected[alert_id] = ExpectedAlert(level, limit, pct)
                            continue
                        refused.setdefault(alert_id, why)
    return expected, {i: why for i, why in refused.items() if i not in expected}


@dataclass(frozen=True)
class DecodedAlerts:
    """The alerts topic decoded: every record that is a budget alert v1, and the others."""

    alerts: list[BudgetAlert]
    invalid: list[str]

    @property
    def triggering_ids(self) -> set[str]:
        return {a.triggered_by for a in self.alerts if a.triggered_by is not None}


def decode_alerts(values: Iterable[bytes | None]) -> DecodedAlerts:
    alerts: list[BudgetAlert] = []
    invalid: list[str] = []
    for value in values:
        try:
            alerts.append(BudgetAlert.model_validate_json(value or b""))
        except ValidationError as error:
            invalid.append(f"not an alert v1 ({error.errors()[0]['msg']}): {value!r:.80}")
    return DecodedAlerts(alerts, invalid)


def _counts_toward(event: SentEvent, alert: BudgetAlert) -> bool:
    """Whether `event` is one of the events the alert's counter sums."""
    return (
        event.tenant_id == alert.tenant_id
        and (alert.scope_type.value, alert.scope_id)
        in _scopes(event.tenant_id, event.deployment_id, event.user_id, event.agent_id)
        and period_start(alert.window, event.occurred_at) == alert.period_start
    )


def alert_problems(
    alert: BudgetAlert,
    expected: ExpectedAlert | None,
    counters: Mapping[SpendKey, Decimal],
    triggering: Mapping[str, SentEvent],
) -> list[str]:
    """What is wrong with one alert's own fields: its id is its key's, `limit_usd` and
    `threshold_pct` are the policy's, its spend is at least the threshold (and no more than the
    counter ever reached), and `triggered_by` is null or an event its counter counts."""
    problems = []
    key_id = alert_id_for(
        tenant_id=alert.tenant_id,
        scope_type=alert.scope_type,
        scope_id=alert.scope_id,
        window=alert.window,
        period_start=alert.period_start,
        level=alert.level,
        limit_usd=alert.limit_usd,
    )
    name = alert.alert_id
    if key_id != name:
        problems.append(f"{name}: its fields make the id {key_id}")
    if expected is not None and alert.threshold_pct != expected.threshold_pct:
        problems.append(
            f"{name}: threshold_pct {alert.threshold_pct}, not {expected.threshold_pct}"
        )
    threshold = threshold_usd(alert.level, alert.limit_usd, alert.threshold_pct)
    if alert.spend_usd < threshold:
        problems.append(f"{name}: spend {alert.spend_usd} below its threshold {threshold}")
    counter = counters.get(
        (
            alert.tenant_id,
            alert.scope_type.value,
            alert.scope_id,
            alert.window.value,
            alert.period_start,
        )
    )
    if counter is None or alert.spend_usd > counter:
        problems.append(f"{name}: spend {alert.spend_usd} above its counter's final {counter}")
    if alert.triggered_by is not None:
        event = triggering.get(alert.triggered_by)
        if event is None or not _counts_toward(event, alert):
            problems.append(f"{name}: triggered_by {alert.triggered_by} is not an event it counts")
    return problems


def compare_alerts(
    expected: Mapping[str, ExpectedAlert],
    refused: Mapping[str, str],
    decoded: DecodedAlerts,
    *,
    counters: Mapping[SpendKey, Decimal],
    triggering: Mapping[str, SentEvent],
) -> CheckRow:
    """Each alert id on the topic once, the ids exactly the expected ones, each alert's fields
    right (see `alert_problems`). `refused` names why an unexpected id should not exist."""
    copies = Counter(alert.alert_id for alert in decoded.alerts)
    twice = sorted(i for i, n in copies.items() if n > 1)
    missing = sorted(set(expected) - set(copies))
    unexpected = sorted(set(copies) - set(expected))
    wrong: list[str] = []
    checked: set[str] = set()
    for alert in decoded.alerts:
        if alert.alert_id not in checked:
            checked.add(alert.alert_id)
            wrong += alert_problems(alert, expected.get(alert.alert_id), counters, triggering)
    problems = [f"{copies[i]} times {i}" for i in twice[:_SHOW]]
    problems += [f"missing {i}" for i in missing[:_SHOW]]
    problems += [
        f"unexpected {i} ({refused.get(i, 'no policy calls for it')})" for i in unexpected[:_SHOW]
    ]
    problems += decoded.invalid[:_SHOW] + wrong[:_SHOW]
    levels = Counter(alert.level.value for alert in decoded.alerts)
    expected_levels = Counter(e.level.value for e in expected.values())
    return _row(
        _ALERTS,
        f"{len(expected)} alerts ({_by_kind(expected_levels)})",
        f"{len(decoded.alerts)} on the topic ({_by_kind(levels)}), {len(twice)} twice, "
        f"{len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(decoded.invalid) + len(wrong)} with wrong fields",
        problems,
    )


# --- 6. Invoices --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BilledLine:
    """What the invoice check reads of an invoice line."""

    tenant_id: str
    deployment_id: str | None
    period: str
    kind: str
    original_period: str
    amount_cents: int


def invoice_totals(
    usage: Mapping[UsageKey, Decimal], closed: Collection[str]
) -> dict[InvoiceKey, int]:
    """round_half_up(exact total x 100) per tenant, deployment and closed month."""
    totals: dict[InvoiceKey, Decimal] = {}
    for (tenant, deployment, _user, _agent, day), amount in usage.items():
        month = f"{day.year:04d}-{day.month:02d}"
        if month in closed:
            key = (tenant, deployment, month)
            totals[key] = EXACT_CONTEXT.add(totals.get(key, _ZERO), amount)
    return {key: usd_to_cents(total) for key, total in totals.items()}


def billed_cents(lines: Iterable[BilledLine], closed: Collection[str]) -> dict[InvoiceKey, int]:
    """Cents billed for each tenant, deployment and closed month M: its `llm_usage` line of M
    plus every `llm_usage_adjustment` line naming M as its original month, in any month."""
    billed: dict[InvoiceKey, int] = {}
    for line in lines:
        month = line.period if line.kind == "llm_usage" else line.original_period
        if month in closed:
            key = (line.tenant_id, line.deployment_id, month)
            billed[key] = billed.get(key, 0) + line.amount_cents
    return billed


def compare_invoices(
    expected: Mapping[InvoiceKey, int],
    billed: Mapping[InvoiceKey, int],
    *,
    closed: Collection[str],
    adjustment_lines: int,
) -> CheckRow:
    """For every closed month, tenant and deployment (null its own), the lines that bill it add
    up to the cents of its exact total; and the run closed at least one month."""
    keys = set(expected) | set(billed)
    wrong = sorted(
        (key for key in keys if expected.get(key, 0) != billed.get(key, 0)),
        key=lambda k: (k[2], k[0], k[1] or ""),
    )
    problems = [
        f"{month} {tenant}/{deployment}: billed {billed.get(key, 0)}, exact {expected.get(key, 0)}"
        for key in wrong[:_SHOW]
        for tenant, deployment, month in [key]
    ]
    if not closed:
        problems.append("no month was closed: the soak expects its month end to be closed")
    months = ", ".join(sorted(closed)) or "none"
    return _row(
        _INVOICES,
        f"at least 1 closed month; {len(keys)} groups billed to the cent",
        f"{len(closed)} closed ({months}), {len(keys)} groups, {len(wrong)} differ, "
        f"{adjustment_lines} adjustment lines",
        problems,
    )


# --- 7. Counts ----------------------------------------------------------------------------------

# Kinds of acknowledged records that can never become a stored row.
_NEVER_STORED = frozenset({"malformed", "conflicting", "transactional_aborted", "retried_send"})


def compare_counts(sent: Mapping[str, int], *, events: int, rows: int) -> CheckRow:
    """For information: records acknowledged by kind against rows stored. It fails only if the
    figures contradict themselves: more distinct events, or more rows, than records of kinds
    that can be stored were acknowledged."""
    storable = sum(n for kind, n in sent.items() if kind not in _NEVER_STORED)
    problems = [
        f"{what} {n} > {storable} storable records acknowledged"
        for what, n in (("ledger events", events), ("rows", rows))
        if n > storable
    ]
    return _row(
        _COUNTS,
        f"{events} distinct events among {storable} storable records",
        f"{rows} rows; sent: {_by_kind(sent)}",
        problems,
    )


def unreadable(row: CheckRow, reason: str) -> CheckRow:
    """A check whose topic could not be read fails, saying so (not as records missing)."""
    return replace(row, found="topic not read", ok=False, detail=reason)


# --- The I/O: fetch, then compare ---------------------------------------------------------------

_EVENTS = """
    SELECT gateway_request_id, tenant_id, deployment_id, user_id, agent_id, customer_charge_usd,
           input_tokens, output_tokens, occurred_at
    FROM llm_usage_events
"""
_EVENTS_BY_ID = _EVENTS + " WHERE gateway_request_id = ANY($1::text[])"
_COUNTED_AMONG = """
    SELECT gateway_request_id FROM budget_counted_events
    WHERE gateway_request_id = ANY($1::text[])
"""
_COUNTERS_SQL = (
    'SELECT tenant_id, scope_type, scope_id, "window", period_start, spend_usd FROM budget_spend'
)
_AUDIT = """
    SELECT tenant_id, scope_type, scope_id, new_policy::text AS new_policy, changed_at
    FROM budget_policy_audit ORDER BY id
"""
_LINES = """
    SELECT tenant_id, deployment_id, period, kind, original_period, amount_cents
    FROM invoice_lines
"""
_CURSOR_PREFETCH = 10_000


def _sent_event(row: asyncpg.Record) -> SentEvent:
    return SentEvent(
        gateway_request_id=row["gateway_request_id"],
        tenant_id=row["tenant_id"],
        deployment_id=row["deployment_id"],
        user_id=row["user_id"],
        agent_id=row["agent_id"],
        customer_charge_usd=row["customer_charge_usd"],
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        occurred_at=row["occurred_at"],
        acked_at=0.0,
    )


async def check_soak(
    *,
    pool: asyncpg.Pool,
    bootstrap_servers: str,
    usage_topic: str,
    dlq_topic: str,
    alerts_topic: str,
    ledger: Ledger,
    clock: SimulatedClock,
    open_period: str,
) -> CheckReport:
    """Run the rollup of `open_period` once (late events of closed months get their adjustment
    lines), read the DLQ and alerts topics to their current ends, read the tables in one
    snapshot, and compare. Call it once every worker has drained and stopped."""
    del usage_topic  # what is stored is checked against the ledger, not against the topic
    await run_rollup(pool, period=open_period)
    alert_records, alerts_unread = await _records_of(bootstrap_servers, alerts_topic)
    dead, dead_unread = await _records_of(bootstrap_servers, dlq_topic)
    decoded = decode_alerts(record.value for record in alert_records)
    async with (
        connection_from(pool) as connection,
        connection.transaction(isolation="repeatable_read", readonly=True),
    ):
        stored = StoredEvents(ledger.events)
        async for row in connection.cursor(_EVENTS, prefetch=_CURSOR_PREFETCH):
            stored.add(_sent_event(row))
        aborted = sorted(ledger.aborted_ids)
        counted = [r[0] for r in await connection.fetch(_COUNTED_AMONG, aborted)]
        counters: dict[SpendKey, Decimal] = {
            (r[0], r[1], r[2], r[3], r[4]): r[5] for r in await connection.fetch(_COUNTERS_SQL)
        }
        audit = [
            ((r["tenant_id"], r["scope_type"], r["scope_id"]), r["new_policy"], r["changed_at"])
            for r in await connection.fetch(_AUDIT)
        ]
        triggering = {
            r["gateway_request_id"]: _sent_event(r)
            for r in await connection.fetch(_EVENTS_BY_ID, sorted(decoded.triggering_ids))
        }
        closed = {r[0] for r in await connection.fetch("SELECT period FROM invoice_periods")}
        lines = [BilledLine(*r) for r in await connection.fetch(_LINES)]

    expected, refused = expected_alerts(counters, policy_history(audit, clock))
    alerts_row = compare_alerts(
        expected, refused, decoded, counters=counters, triggering=triggering
    )
    dead_row = compare_dead_letters(ledger.dead_letters, dead_letter_records(dead))
    return CheckReport(
        rows=(
            compare_stored(ledger.events, stored),
            compare_aborted(ledger.aborted_ids, stored.ids, counted),
            unreadable(dead_row, dead_unread) if dead_unread else dead_row,
            compare_counters(spend_from_usage(stored.usage), counters),
            unreadable(alerts_row, alerts_unread) if alerts_unread else alerts_row,
            compare_invoices(
                invoice_totals(stored.usage, closed),
                billed_cents(lines, closed),
                closed=closed,
                adjustment_lines=sum(1 for line in lines if line.kind == "llm_usage_adjustment"),
            ),
            compare_counts(ledger.sent, events=len(ledger.events), rows=stored.rows),
        )
    )


def dead_letter_records(
    records: Iterable[ConsumerRecord[bytes, bytes]],
) -> list[tuple[str, str | None]]:
    """(value digest, `dlq.reason`) of each DLQ record."""
    found = []
    for record in records:
        reasons = [
            bytes(v).decode(errors="replace") for k, v in record.headers if k == REASON_HEADER
        ]
        found.append((value_digest(record.value or b""), reasons[0] if reasons else None))
    return found


async def _records_of(
    bootstrap_servers: str, topic: str
) -> tuple[list[ConsumerRecord[bytes, bytes]], str]:
    """The topic's committed records and "", or no records and why it could not be read."""
    try:
        return await read_committed(bootstrap_servers, topic), ""
    except TopicUnreadableError as error:
        return [], str(error)


class TopicUnreadableError(Exception):
    """A topic could not be read to its end, after retrying for a while."""


async def read_committed(
    bootstrap_servers: str, topic: str, *, within: float = 60.0, stall: float = 30.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every committed record of every partition of `topic`, from the beginning to the end
    offsets taken when the read starts. Brokers may have just restarted: a Kafka or network
    error (or no progress for `stall` seconds) starts the read again, for up to `within`."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await _read_to_end(bootstrap_servers, topic, stall=stall)
        except (KafkaError, OSError, TimeoutError) as error:
            if time.monotonic() >= deadline:
                raise TopicUnreadableError(
                    f"{topic} could not be read to its end within {within:.0f} s: "
                    f"{type(error).__name__}: {error}"
                ) from error
            await asyncio.sleep(1.0)


async def _partitions(bootstrap_servers: str, topic: str) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        await admin.start()
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described["error_code"]:
        raise for_code(described["error_code"])(f"describing {topic}")
    return sorted(TopicPartition(topic, int(p["partition"])) for p in described["partitions"])


async def _read_to_end(
    bootstrap_servers: str, topic: str, *, stall: float
) -> list[ConsumerRecord[bytes, bytes]]:
    partitions = await _partitions(bootstrap_servers, topic)
    reader: AIOKafkaConsumer[bytes, bytes] = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        await reader.start()
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        # Under read_committed: the last stable offsets, so nothing committed later is waited for.
        ends = await reader.end_offsets(partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        behind = [tp for tp in partitions if await reader.position(tp) < ends[tp]]
        progressed = time.monotonic()
        while behind:
            fetched = await reader.getmany(*behind, timeout_ms=500)
            for tp, batch in fetched.items():
                records.extend(record for record in batch if record.offset < ends[tp])
            still = [tp for tp in behind if await reader.position(tp) < ends[tp]]
            if fetched or len(still) < len(behind):
                progressed = time.monotonic()
            elif time.monotonic() - progressed > stall:
                raise KafkaTimeoutError(f"no progress on {still} for {stall:.0f} s")
            behind = still
        return records
    finally:
        await reader.stop()
