"""Reconcile's judgement, pure: what the stored numbers should be (from one pass over the
period's events) against what is stored, with the exact difference of each drift.

Every comparison takes plain rows and returns `Drift`s; storage/reconcile.py reads the rows and
rollup/reconcile.py runs the chunks and the confirmation (design: corrections-reconcile.md §10).
A difference is always found - expected.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final, NamedTuple, TypeAlias

from llm_usage.domain.budgets import (
    AlertLevel,
    BudgetWindow,
    CounterKey,
    SpendKey,
    period_start,
    threshold_usd,
)
from llm_usage.domain.corrections import Correction, Effective, effective_after, winner
from llm_usage.domain.holds import hold_counters
from llm_usage.domain.money import EXACT_CONTEXT, usd_to_cents


class DriftKind(StrEnum):
    """In the order they are listed (and were built)."""

    USAGE_TOTAL = "usage_total"
    USAGE_DIMENSION = "usage_dimension"
    BUDGET_COUNTER = "budget_counter"
    INVOICE_TOTAL = "invoice_total"
    ALERT_MISSING = "alert_missing"
    ALERT_NOT_IN_OUTBOX = "alert_not_in_outbox"
    ALERT_TWICE_ON_TOPIC = "alert_twice_on_topic"
    ALERT_NOT_ON_TOPIC = "alert_not_on_topic"
    ALERT_UNPUBLISHED = "alert_unpublished"
    HOLD_LEDGER = "hold_ledger"
    CORRECTION_EFFECTIVE = "correction_effective"
    CORRECTION_BUDGET = "correction_budget"
    CORRECTION_STUCK = "correction_stuck"


# Written by another worker than the events they derive from (the budget consumer, the relay):
# a live system shows them for a moment, so they count only once confirmed on a second read.
LAGGING_KINDS: Final = frozenset(
    {
        DriftKind.BUDGET_COUNTER,
        DriftKind.ALERT_MISSING,
        DriftKind.ALERT_NOT_IN_OUTBOX,
        DriftKind.ALERT_TWICE_ON_TOPIC,
        DriftKind.ALERT_NOT_ON_TOPIC,
        DriftKind.ALERT_UNPUBLISHED,
        DriftKind.HOLD_LEDGER,
        DriftKind.CORRECTION_BUDGET,
    }
)

# A drift's key: its named parts, in the order they print.
Key: TypeAlias = tuple[tuple[str, Any], ...]
Figures: TypeAlias = Mapping[str, Decimal | int]

# The figures of a `usage_daily_totals` row (Usage's fields) and of a `usage_daily_dimensions`
# row (storage/usage_dimensions.daily_dimensions' order).
TOTAL_FIGURES: Final = (
    "charge_usd",
    "input_tokens",
    "output_tokens",
    "requests",
    "estimated_charge_usd",
)
DIMENSION_FIGURES: Final = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "total_tokens",
    "charge_usd",
    "estimated_charge_usd",
)


@dataclass(frozen=True)
class Drift:
    """One stored number (or row of numbers) that is not what the events make it."""

    kind: DriftKind
    key: Key
    expected: Decimal | int | Figures | None
    found: Decimal | int | Figures | None
    difference: Decimal | int | Figures

    @property
    def tenant_id(self) -> str:
        return str(dict(self.key)["tenant_id"])

    @property
    def identity(self) -> tuple[DriftKind, Key, Any]:
        """What a second read must repeat for the drift to be confirmed."""
        if isinstance(self.difference, Mapping):
            return (self.kind, self.key, tuple(sorted(self.difference.items())))
        return (self.kind, self.key, self.difference)

    def text(self) -> str:
        """One line: `budget_counter t1 deployment dep-7 monthly 2026-11-01: expected 81.2000
        found 81.2100 difference +0.0100` (per figure for a row of figures)."""
        where = " ".join(_text(value) for _, value in self.key)
        if isinstance(self.difference, Mapping):
            expected = self.expected if isinstance(self.expected, Mapping) else {}
            found = self.found if isinstance(self.found, Mapping) else {}
            parts = [
                f"{name} expected {_text(expected.get(name, 0))} found "
                f"{_text(found.get(name, 0))} difference {_signed(change)}"
                for name, change in self.difference.items()
            ]
            missing = " (no stored row)" if self.found is None else ""
            missing = " (no such events)" if self.expected is None else missing
            return f"{self.kind} {where}{missing}: " + "; ".join(parts)
        return (
            f"{self.kind} {where}: expected {_text(self.expected)} found {_text(self.found)} "
            f"difference {_signed(self.difference)}"
        )

    def as_json(self) -> dict[str, Any]:
        """Money as exact strings, counts as integers, dates as ISO strings."""
        return {
            "kind": self.kind.value,
            "key": {name: _json(value) for name, value in self.key},
            "expected": _json(self.expected),
            "found": _json(self.found),
            "difference": _json(self.difference),
        }


def _text(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _signed(value: object) -> str:
    if isinstance(value, Decimal | int) and value >= 0:
        return f"+{value}"
    return str(value)


def _json(value: object) -> Any:
    if isinstance(value, Mapping):
        return {name: _json(v) for name, v in value.items()}
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, date):
        return value.isoformat()
    return value


# ---- the keys of what the events make of the period ----------------------------------------

# (tenant_id, dimension, UTC day, key) -> DIMENSION_FIGURES, as usage_daily_dimensions holds.
DimensionKey: TypeAlias = tuple[str, str, date, str | None]
TotalsKey: TypeAlias = tuple[str, str | None, date]
InvoiceKey: TypeAlias = tuple[str, str | None, str]  # tenant, deployment, month


# ---- comparisons ---------------------------------------------------------------------------


def compare_rows(
    kind: DriftKind,
    names: Sequence[str],
    figure_names: Sequence[str],
    expected: Mapping[tuple[Any, ...], Sequence[Any]],
    found: Mapping[tuple[Any, ...], Sequence[Any]],
) -> list[Drift]:
    """Rows of figures keyed alike: a row missing on one side counts as zeros there (a stored
    row of zeros is no drift); each drift lists the figures that differ."""
    drifts = []
    for key in sorted(expected.keys() | found.keys(), key=_sort_key):
        want, have = expected.get(key), found.get(key)
        want_figures = dict(zip(figure_names, want or [0] * len(figure_names), strict=True))
        have_figures = dict(zip(figure_names, have or [0] * len(figure_names), strict=True))
        difference = {
            name: _minus(have_figures[name], want_figures[name])
            for name in figure_names
            if have_figures[name] != want_figures[name]
        }
        if difference:
            drifts.append(
                Drift(
                    kind,
                    tuple(zip(names, key, strict=True)),
                    None if want is None else want_figures,
                    None if have is None else have_figures,
                    difference,
                )
            )
    return drifts


def compare_values(
    kind: DriftKind,
    names: Sequence[str],
    expected: Mapping[tuple[Any, ...], Decimal | int],
    found: Mapping[tuple[Any, ...], Decimal | int],
) -> list[Drift]:
    """One number per key; a key missing on one side is 0 there."""
    drifts = []
    for key in sorted(expected.keys() | found.keys(), key=_sort_key):
        want, have = expected.get(key, 0), found.get(key, 0)
        if want != have:
            drifts.append(
                Drift(kind, tuple(zip(names, key, strict=True)), want, have, _minus(have, want))
            )
    return drifts


def _minus(a: Any, b: Any) -> Any:
    if isinstance(a, Decimal) or isinstance(b, Decimal):
        return EXACT_CONTEXT.subtract(Decimal(a), Decimal(b))
    return a - b


def _sort_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((part is not None, "" if part is None else part) for part in key)


TOTALS_KEY_NAMES: Final = ("tenant_id", "deployment_id", "day")
DIMENSION_KEY_NAMES: Final = ("tenant_id", "dimension", "day", "key")
COUNTER_KEY_NAMES: Final = ("tenant_id", "scope_type", "scope_id", "window", "period_start")
INVOICE_KEY_NAMES: Final = ("tenant_id", "deployment_id", "period")


def compare_usage(
    totals: tuple[Mapping[TotalsKey, Sequence[Any]], Mapping[TotalsKey, Sequence[Any]]],
    dimensions: tuple[Mapping[DimensionKey, Sequence[Any]], Mapping[DimensionKey, Sequence[Any]]],
) -> list[Drift]:
    """`usage_daily_totals` and `usage_daily_dimensions` against the one pass: each an
    (expected, found) pair of rows (storage hands over only those that differ)."""
    return compare_rows(DriftKind.USAGE_TOTAL, TOTALS_KEY_NAMES, TOTAL_FIGURES, *totals) + (
        compare_rows(DriftKind.USAGE_DIMENSION, DIMENSION_KEY_NAMES, DIMENSION_FIGURES, *dimensions)
    )


def compare_counters(
    expected: Mapping[SpendKey, Decimal], counters: Mapping[SpendKey, Decimal]
) -> list[Drift]:
    """Budget counters of periods from the budget horizon on (earlier ones are pruned, and
    events of their days count toward none: storage leaves both out)."""
    return compare_values(DriftKind.BUDGET_COUNTER, COUNTER_KEY_NAMES, expected, counters)


def expected_invoices(
    charges: Mapping[InvoiceKey, Decimal], period_charges: Mapping[InvoiceKey, Decimal]
) -> dict[InvoiceKey, int]:
    """Cents per (tenant, deployment, month): its period charge's when it has one, else its
    exact charge's, rounded half up once."""
    return {
        key: usd_to_cents(period_charges.get(key, total))
        for key, total in {**charges, **period_charges}.items()
    }


def compare_invoices(
    expected: Mapping[InvoiceKey, int], billed: Mapping[InvoiceKey, int]
) -> list[Drift]:
    """A closed month's lines (and its would-be adjustment) against its exact cents."""
    return compare_values(DriftKind.INVOICE_TOTAL, INVOICE_KEY_NAMES, expected, billed)


class OpenHold(NamedTuple):
    tenant_id: str
    deployment_id: str | None
    user_id: str | None
    agent_id: str | None
    day: date
    amount_usd: Decimal


def compare_holds(open_holds: Iterable[OpenHold], held: Mapping[SpendKey, Decimal]) -> list[Drift]:
    """`budget_held.placed_usd - ended_usd` against the open holds of each counter."""
    expected: dict[SpendKey, Decimal] = defaultdict(Decimal)
    for hold in open_holds:
        for counter in hold_counters(
            hold.tenant_id, hold.deployment_id, hold.user_id, hold.agent_id, hold.day
        ):
            expected[counter] = EXACT_CONTEXT.add(expected[counter], hold.amount_usd)
    return compare_values(DriftKind.HOLD_LEDGER, COUNTER_KEY_NAMES, expected, held)


# ---- alerts --------------------------------------------------------------------------------


class OutboxAlert(NamedTuple):
    alert_id: str
    tenant_id: str
    published: bool
    overdue: bool  # unpublished for longer than the relay ever takes
    published_at: datetime | None


class Policy(NamedTuple):
    """A current budget policy."""

    tenant_id: str
    scope_type: str
    scope_id: str
    daily_limit_usd: Decimal | None
    monthly_limit_usd: Decimal | None
    warn_threshold_pct: int
    updated_at: datetime


@dataclass(frozen=True)
class TopicAlerts:
    """The alerts topic read to its end: copies per alert id, each id's (tenant, period start),
    and from when the topic still holds everything (None: nothing was ever deleted from it)."""

    copies: Mapping[str, int]
    owners: Mapping[str, tuple[str, date]]
    retained_since: datetime | None = None

    def of(self, tenants: Iterable[str], first_day: date, next_month: date) -> dict[str, int]:
        """Copies of the alerts of `tenants` whose periods start in [first_day, next_month)."""
        wanted = set(tenants)
        return {
            alert_id: copies
            for alert_id, copies in self.copies.items()
            if self.owners[alert_id][0] in wanted
            and first_day <= self.owners[alert_id][1] < next_month
        }


def alerts_due(
    spend: Mapping[SpendKey, Decimal], policies: Iterable[Policy]
) -> dict[str, CounterKey]:
    """The alert ids the current policies call for: each level a counter's expected spend
    reached, in the periods from the one holding the policy's last change on (the contract
    re-examines no earlier period)."""
    by_scope = {(p.tenant_id, p.scope_type, p.scope_id): p for p in policies}
    due: dict[str, CounterKey] = {}
    for key, amount in spend.items():
        policy = by_scope.get(key[:3])
        if policy is None:
            continue
        counter = CounterKey.from_spend_key(key)
        limit = (
            policy.daily_limit_usd
            if counter.window is BudgetWindow.DAILY
            else policy.monthly_limit_usd
        )
        if limit is None or counter.period_start < period_start(counter.window, policy.updated_at):
            continue
        for level in AlertLevel:
            if amount >= threshold_usd(level, limit, policy.warn_threshold_pct):
                due[counter.alert_id(level, limit)] = counter
    return due


def compare_alerts(
    due: Mapping[str, CounterKey],
    outbox: Sequence[OutboxAlert],
    topic: Mapping[str, int] | None,
    *,
    retained_since: datetime | None = None,
) -> list[Drift]:
    """The outbox against what the policies call for (an alert neither in the outbox nor on
    the topic is missing), and the outbox against the topic (None: not read): each alert
    published, and on the topic."""
    stored = {alert.alert_id: alert for alert in outbox}
    sent = topic or {}  # an alert on the topic but not in the outbox is `alert_not_in_outbox`
    drifts = [
        _alert(DriftKind.ALERT_MISSING, counter.tenant_id, alert_id, 1, 0)
        for alert_id, counter in sorted(due.items())
        if alert_id not in stored and alert_id not in sent
    ]
    drifts += [
        _alert(DriftKind.ALERT_UNPUBLISHED, alert.tenant_id, alert.alert_id, 1, 0)
        for alert in sorted(outbox)
        if not alert.published and alert.overdue
    ]
    if topic is None:
        return drifts
    for alert in sorted(outbox):
        retained = (
            retained_since is None
            or alert.published_at is None
            or alert.published_at >= retained_since
        )
        if alert.published and retained and alert.alert_id not in topic:
            drifts.append(
                _alert(DriftKind.ALERT_NOT_ON_TOPIC, alert.tenant_id, alert.alert_id, 1, 0)
            )
    return drifts


def compare_topic(
    on_topic: Mapping[str, tuple[str, int]], outbox_ids: Iterable[str]
) -> list[Drift]:
    """Alerts on the topic (id -> (tenant, copies)) that the outbox does not hold, or holds
    but the topic carries more than once."""
    stored = set(outbox_ids)
    drifts = []
    for alert_id, (tenant, copies) in sorted(on_topic.items()):
        if alert_id not in stored:
            drifts.append(_alert(DriftKind.ALERT_NOT_IN_OUTBOX, tenant, alert_id, 0, copies))
        elif copies > 1:
            drifts.append(_alert(DriftKind.ALERT_TWICE_ON_TOPIC, tenant, alert_id, 1, copies))
    return drifts


def _alert(kind: DriftKind, tenant_id: str, alert_id: str, expected: int, found: int) -> Drift:
    return Drift(
        kind, (("tenant_id", tenant_id), ("alert_id", alert_id)), expected, found, found - expected
    )


# ---- corrections ---------------------------------------------------------------------------

# A corrected event: (tenant_id, occurred_at, gateway_request_id), its Tier 1 key.
EventKey: TypeAlias = tuple[str, datetime, str]
# Every value of an effective row, in Effective's order.
EFFECTIVE_FIELDS: Final = tuple(f.name for f in fields(Effective))


def compare_effective(
    originals: Mapping[EventKey, Effective],
    history: Mapping[EventKey, Sequence[Correction]],
    stored: Mapping[EventKey, Effective],
) -> list[Drift]:
    """`usage_event_effective` against the original event with the winner of its applied
    corrections laid over it; a row for an event without applied corrections is a drift too.
    Events no longer stored (`originals` lacks them) are not judged. The difference lists each
    field that differs: numbers as found - expected, the others as the value found."""
    drifts = []
    for key in sorted((history.keys() | stored.keys()) & originals.keys()):
        corrections = history.get(key, ())
        expected = effective_after(originals[key], winner(corrections)) if corrections else None
        found = stored.get(key)
        if expected == found:
            continue
        want = None if expected is None else _fields(expected)
        have = None if found is None else _fields(found)
        names = [n for n in EFFECTIVE_FIELDS if (want or {}).get(n) != (have or {}).get(n)]
        difference = {
            name: _field_difference((want or {}).get(name), (have or {}).get(name))
            for name in names
        }
        tenant, occurred_at, request_id = key
        drifts.append(
            Drift(
                DriftKind.CORRECTION_EFFECTIVE,
                (
                    ("tenant_id", tenant),
                    ("occurred_at", occurred_at),
                    ("gateway_request_id", request_id),
                ),
                want,
                have,
                difference,
            )
        )
    return drifts


def _fields(effective: Effective) -> dict[str, Any]:
    return {name: getattr(effective, name) for name in EFFECTIVE_FIELDS}


def _field_difference(expected: Any, found: Any) -> Any:
    def number(value: Any) -> bool:
        return isinstance(value, Decimal | int) and not isinstance(value, bool)

    return _minus(found, expected) if number(expected) and number(found) else found


class BudgetRecord(NamedTuple):
    """A correction the usage consumer judged, and whether the budget consumer recorded it."""

    tenant_id: str
    correction_id: str
    applied: bool  # the usage consumer's verdict: the budget consumer must apply it too
    recorded: bool  # `budget_corrections` holds it


def compare_budget_records(records: Iterable[BudgetRecord]) -> list[Drift]:
    """Every applied correction recorded by the budget consumer, and no other (1 or 0 each)."""
    return [
        Drift(
            DriftKind.CORRECTION_BUDGET,
            (("tenant_id", r.tenant_id), ("correction_id", r.correction_id)),
            int(r.applied),
            int(r.recorded),
            int(r.recorded) - int(r.applied),
        )
        for r in sorted(records)
        if r.applied != r.recorded
    ]


class StuckWait(NamedTuple):
    """A correction still waiting past the usage consumer's deadline and a margin."""

    consumer: str
    tenant_id: str
    correction_id: str


def compare_waits(stuck: Iterable[StuckWait]) -> list[Drift]:
    """Every correction waiting past its deadline: none is expected."""
    return [
        Drift(
            DriftKind.CORRECTION_STUCK,
            (
                ("tenant_id", wait.tenant_id),
                ("consumer", wait.consumer),
                ("correction_id", wait.correction_id),
            ),
            0,
            1,
            1,
        )
        for wait in sorted(stuck, key=lambda w: (w.tenant_id, w.consumer, w.correction_id))
    ]


# ---- confirmation --------------------------------------------------------------------------


def needs_confirming(drifts: Iterable[Drift]) -> list[Drift]:
    """The candidates a second read must repeat: the kinds that lag by design."""
    return [drift for drift in drifts if drift.kind in LAGGING_KINDS]


def confirmed(first: Sequence[Drift], second: Sequence[Drift]) -> list[Drift]:
    """What to report: every drift of a kind that cannot lag, and each lagging candidate of the
    first read that the second read found again with the same key and difference."""
    again = {drift.identity for drift in second}
    return [drift for drift in first if drift.kind not in LAGGING_KINDS or drift.identity in again]


def by_kind(drifts: Iterable[Drift]) -> dict[str, int]:
    """Drifts per kind, every kind present (0 when none)."""
    counts = Counter(drift.kind for drift in drifts)
    return {kind.value: counts.get(kind, 0) for kind in DriftKind}
