"""The usage consumer's corrections (design §5.1): in the batch's transaction, after its events
and before its aggregate write, each correction is judged (a repeat, a re-used id, or new), its
event found, and the new ones applied as deltas to every aggregate; one whose event is not
stored yet waits in `correction_waits` (the side task in correction_waits.py retries it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from llm_usage.domain.corrections import (
    Correction,
    Effective,
    Verdict,
    differing_fields,
    effective_after,
    original,
    rank,
    same_correction,
)
from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.domain.periods import period_of
from llm_usage.domain.usage import Usage
from llm_usage.runtime.correction_metrics import CorrectionMetrics
from llm_usage.runtime.handler import BatchOutcome, BatchResult, DeadLetter, Record
from llm_usage.schemas.dead_letter import DeadLetterReason
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.corrections import (
    CorrectionKey,
    CorrectionWrite,
    EffectiveNow,
    EventKey,
    JudgedCorrection,
    Waiting,
    effective_now,
    find_events,
    forget_waits,
    judged,
    lock_correction_buckets,
    park,
    write_effective,
    write_verdicts,
)
from llm_usage.storage.event_ids import TierOneKey
from llm_usage.storage.invoice_lines import closed_periods
from llm_usage.storage.pool import Connection
from llm_usage.storage.usage_dimensions import (
    DimensionKey,
    daily_dimensions,
    move_daily_dimensions,
)
from llm_usage.storage.usage_totals import (
    TotalsKey,
    daily_totals,
    lock_months_shared,
    move_daily_totals,
)

CONSUMER = "usage"

Copy = tuple[Record, Correction]

# --- contributions and deltas (pure) ----------------------------------------------------------


def effective_row(row: UsageRow, effective: Effective) -> UsageRow:
    """The stored event with its effective values."""
    fields: dict[str, Any] = effective.row_fields()
    return row._replace(**fields)


def totals_contribution(row: UsageRow, effective: Effective) -> dict[TotalsKey, Usage]:
    """What an event with these effective values adds to `usage_daily_totals`."""
    return {} if effective.voided else daily_totals([effective_row(row, effective)])


def dimensions_contribution(row: UsageRow, effective: Effective) -> dict[DimensionKey, list[Any]]:
    """What an event with these effective values adds to `usage_daily_dimensions`."""
    return {} if effective.voided else daily_dimensions([effective_row(row, effective)])


def add_totals(
    into: dict[TotalsKey, Usage], more: Mapping[TotalsKey, Usage], *, sign: int = 1
) -> dict[TotalsKey, Usage]:
    """`into` + sign * `more` per key, in place; keys that come to zero are dropped."""
    for key, usage in more.items():
        found = into.get(key, Usage())
        moved = found + usage if sign > 0 else found - usage
        if moved == Usage():
            into.pop(key, None)
        else:
            into[key] = moved
    return into


def add_dimensions(
    into: dict[DimensionKey, list[Any]],
    more: Mapping[DimensionKey, Sequence[Any]],
    *,
    sign: int = 1,
) -> dict[DimensionKey, list[Any]]:
    """`into` + sign * `more` per key and figure, in place; keys that come to zero are dropped."""
    for key, figures in more.items():
        found = into.get(key)
        signed = figures if sign > 0 else [_negated(f) for f in figures]
        moved = (
            list(signed)
            if found is None
            else [_sum(a, b) for a, b in zip(found, signed, strict=True)]
        )
        if any(moved):
            into[key] = moved
        else:
            into.pop(key, None)
    return into


def _negated(figure: Any) -> Any:
    return EXACT_CONTEXT.minus(figure) if isinstance(figure, Decimal) else -figure


def _sum(a: Any, b: Any) -> Any:
    return EXACT_CONTEXT.add(a, b) if isinstance(a, Decimal) else a + b


def _charge(effective: Effective) -> Decimal:
    return Decimal(0) if effective.voided else effective.customer_charge_usd


def _tier_one_key(row: UsageRow) -> TierOneKey:
    return (row.tenant_id, row.occurred_at, row.gateway_request_id)


# --- planning (pure) --------------------------------------------------------------------------


@dataclass
class CorrectionPlan:
    """What applying some corrections writes, and by how much it moves the aggregates."""

    writes: list[CorrectionWrite] = field(default_factory=list)
    effective: dict[TierOneKey, EffectiveNow] = field(default_factory=dict)
    totals: dict[TotalsKey, Usage] = field(default_factory=dict)
    dimensions: dict[DimensionKey, list[Any]] = field(default_factory=dict)
    won: int = 0
    superseded: int = 0


def plan_corrections(
    corrections: Sequence[Correction],
    events: Mapping[EventKey, UsageRow],
    current: Mapping[TierOneKey, EffectiveNow],
    *,
    closed_months: Collection[str] = (),
) -> CorrectionPlan:
    """Apply `corrections` (each one's event in `events`), in order, to their events' current
    state (`current`, else the original): a correction that outranks its event's winner makes
    the effective values `effective_after(original, it)` and moves the aggregates by the
    difference; one that does not is history only. Several of one event chain in order.

    The differences are summed once for the whole batch (the rows as they count after, minus
    as they counted before): the same sums as per correction, at a fraction of the cost."""
    plan = CorrectionPlan()
    state: dict[TierOneKey, EffectiveNow] = dict(current)
    added: list[UsageRow] = []  # each winner's event with its new effective values
    removed: list[UsageRow] = []  # ... and with the values it counted with before
    for correction in corrections:
        row = events[correction.event]
        key = _tier_one_key(row)
        base = original(row)
        now = state.get(key)
        before = base if now is None else now.effective
        count = 0 if now is None else now.corrections
        if now is not None and rank(correction) <= now.winner:
            plan.superseded += 1
            state[key] = EffectiveNow(now.effective, now.winner, count + 1)
            plan.effective[key] = state[key]
            plan.writes.append(
                CorrectionWrite(correction, Verdict.APPLIED, event_occurred_at=row.occurred_at)
            )
            continue
        after = effective_after(base, correction)
        plan.won += 1
        state[key] = plan.effective[key] = EffectiveNow(after, rank(correction), count + 1)
        if not after.voided:
            added.append(effective_row(row, after))
        if not before.voided:
            removed.append(effective_row(row, before))
        plan.writes.append(
            CorrectionWrite(
                correction,
                Verdict.APPLIED,
                event_occurred_at=row.occurred_at,
                won=True,
                late=period_of(row.occurred_at.date()) in closed_months,
                from_deployment_id=before.deployment_id,
                to_deployment_id=after.deployment_id,
                charge_delta_usd=EXACT_CONTEXT.subtract(_charge(after), _charge(before)),
            )
        )
    add_totals(plan.totals, daily_totals(added))
    add_totals(plan.totals, daily_totals(removed), sign=-1)
    add_dimensions(plan.dimensions, daily_dimensions(added))
    add_dimensions(plan.dimensions, daily_dimensions(removed), sign=-1)
    return plan


@dataclass
class Judging:
    """A batch's corrections after their keys' verdicts were read: the first copy of each key
    to apply, and what became of every other copy."""

    candidates: list[Copy] = field(default_factory=list)
    outcome: BatchOutcome = field(default_factory=BatchOutcome)
    resolved: list[CorrectionKey] = field(default_factory=list)  # judged before: waits end


def judge(copies: Sequence[Copy], known: Mapping[CorrectionKey, JudgedCorrection]) -> Judging:
    """A copy of a key applied before (or of a key's first copy in this batch) is a duplicate
    when it is the same correction, else a conflicting duplicate for the dead-letter topic; the
    first copy of any other key (never judged, or judged unknown: a replay) is a candidate."""
    judging = Judging()
    truths: dict[CorrectionKey, Correction] = {
        key: found.correction for key, found in known.items() if found.verdict is Verdict.APPLIED
    }
    counts: Counter[BatchResult] = Counter()
    for record, correction in copies:
        key = correction.key
        truth = truths.get(key)
        if truth is None:
            truths[key] = correction
            judging.candidates.append((record, correction))
            continue
        if key in known:
            judging.resolved.append(key)
        if same_correction(truth, correction):
            counts[BatchResult.DUPLICATE] += 1
            continue
        counts[BatchResult.CONFLICT] += 1
        detail = (
            f"correction_id {correction.correction_id!r} of tenant {correction.tenant_id!r} is "
            "already known with a different " + ", ".join(differing_fields(truth, correction))
        )
        judging.outcome.dead_letters.append(
            DeadLetter(record, DeadLetterReason.CONFLICTING_DUPLICATE, detail)
        )
    judging.outcome.counts.update(counts)
    return judging


# --- in the batch's transaction ---------------------------------------------------------------


@dataclass
class AppliedCorrections:
    """What a batch's corrections did: their records' outcome, the aggregates' deltas, the
    copies left waiting for their event, and the counts for the corrections metric."""

    outcome: BatchOutcome
    totals: dict[TotalsKey, Usage]
    dimensions: dict[DimensionKey, list[Any]]
    waiting: list[Copy]
    results: Counter[str]
    slow_lookups: int = 0


async def apply_corrections(
    connection: Connection,
    copies: Sequence[Copy],
    *,
    now: datetime,
    wait_seconds: float,
    citus: bool | None = None,
) -> AppliedCorrections:
    """Judge and apply `copies` in the caller's transaction (design §5.1 steps 1-6); the
    caller moves the aggregates by the deltas returned (`move_aggregates`). `citus`: the
    database is a Citus coordinator (None: asked when events are looked up)."""
    await lock_correction_buckets(connection, (c.event for _, c in copies))
    known = await judged(connection, list(dict.fromkeys(c.key for _, c in copies)))
    judging = judge(copies, known)
    found = await find_events(connection, [c for _, c in judging.candidates], citus=citus)
    applicable = [c for _, c in judging.candidates if c.event in found.rows]
    waiting = [(r, c) for r, c in judging.candidates if c.event not in found.rows]
    closed: Collection[str] = ()
    if applicable:
        days = [found.rows[c.event].occurred_at.date() for c in applicable]
        # `late` is read under the months' shared locks: a close either committed before (the
        # month is closed here) or waits for this batch (its lines include these deltas).
        await lock_months_shared(connection, days)
        closed = (await closed_periods(connection)).keys()
    current = await effective_now(
        connection, list(dict.fromkeys(_tier_one_key(found.rows[c.event]) for c in applicable))
    )
    plan = plan_corrections(applicable, found.rows, current, closed_months=closed)
    await write_verdicts(connection, plan.writes)
    await write_effective(connection, plan.effective)
    await forget_waits(connection, CONSUMER, [*judging.resolved, *(c.key for c in applicable)])
    until = now + timedelta(seconds=wait_seconds)
    await park(
        connection,
        CONSUMER,
        [Waiting.of(r, c, first_seen_at=now, wait_until=until) for r, c in waiting],
    )
    outcome = judging.outcome
    outcome.counts[BatchResult.RECORDED] += len(applicable)
    if waiting:
        outcome.counts[BatchResult.DEFERRED] += len(waiting)
    results = Counter(
        {
            "applied": plan.won,
            "superseded": plan.superseded,
            "deferred": len(waiting),
            "duplicate": outcome.counts[BatchResult.DUPLICATE],
            "conflict": outcome.counts[BatchResult.CONFLICT],
        }
    )
    outcome.counts = +outcome.counts  # no zero counts
    return AppliedCorrections(
        outcome, plan.totals, plan.dimensions, waiting, +results, found.slow_lookups
    )


def count_corrections(metrics: CorrectionMetrics, applied: AppliedCorrections) -> None:
    """Count what became of the corrections once their transaction committed."""
    for result, n in applied.results.items():
        metrics.count(result, n)
    if applied.slow_lookups:
        metrics.slow_lookups.labels(metrics.consumer).inc(applied.slow_lookups)


async def move_aggregates(
    connection: Connection, stored: Sequence[UsageRow], applied: AppliedCorrections
) -> None:
    """Move both aggregates by the batch's stored events plus its corrections' deltas."""
    totals = add_totals(daily_totals(stored), applied.totals)
    dimensions = add_dimensions(daily_dimensions(stored), applied.dimensions)
    await move_daily_totals(connection, totals)
    await move_daily_dimensions(connection, dimensions, may_fall=applied.dimensions.keys())
