"""Pure decisions of the usage consumer: decode a batch, plan each id against the two tiers of
its identity (domain/identity.py), then settle every record once the database has answered."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any, NamedTuple

from llm_usage.domain.corrections import Correction
from llm_usage.domain.identity import Identity, identity_of, is_expired
from llm_usage.domain.period_charges import PeriodCharge
from llm_usage.runtime.handler import BatchOutcome, BatchResult, DeadLetter, Record
from llm_usage.runtime.pricing import PriceSnapshot
from llm_usage.schemas.dead_letter import DeadLetterReason, Rejection
from llm_usage.schemas.decoding import decode_usage_topic_record
from llm_usage.schemas.usage_event import (
    CONFLICT_FIELDS,
    UnpricedEvent,
    UsageRow,
    conflicting_fields,
)
from llm_usage.storage.event_ids import KnownIdentities, TierOneKey


@dataclass
class DecodedBatch:
    """A batch after decoding: valid events grouped by id (first seen first), the period
    charges and the corrections in batch order, and the rejects."""

    occurrences: dict[str, list[tuple[Record, UsageRow]]] = field(default_factory=dict)
    rejected: list[DeadLetter] = field(default_factory=list)
    period_charges: list[tuple[Record, PeriodCharge]] = field(default_factory=list)
    corrections: list[tuple[Record, Correction]] = field(default_factory=list)

    def first_occurrences(self) -> list[UsageRow]:
        """One event per id: the one to try to insert."""
        return [found[0][1] for found in self.occurrences.values()]


def decode_batch(
    records: Sequence[Record],
    *,
    now: datetime,
    prices: PriceSnapshot,
    into: DecodedBatch | None = None,
) -> DecodedBatch:
    """Decode every record (adding to `into`, if given), pricing those that sent no charge; a
    record that breaks a rule or has no price becomes a dead letter, never an error."""
    batch = DecodedBatch() if into is None else into
    for record in records:
        decoded = decode_usage_topic_record(record.value, now=now)
        if isinstance(decoded, UnpricedEvent):
            decoded = prices.price(record, decoded)
        if isinstance(decoded, Rejection):
            batch.rejected.append(DeadLetter(record, decoded.reason, decoded.detail))
        elif isinstance(decoded, PeriodCharge):
            batch.period_charges.append((record, decoded))
        elif isinstance(decoded, Correction):
            batch.corrections.append((record, decoded))
        else:
            batch.occurrences.setdefault(decoded.gateway_request_id, []).append((record, decoded))
    return batch


_CONFLICT_VALUES = operator.attrgetter(*CONFLICT_FIELDS)
_TRUTH_VALUES = operator.itemgetter(*CONFLICT_FIELDS)


def conflict_view(event: UsageRow) -> dict[str, Any]:
    """The fields of `event` that must match the stored row for it to be a plain duplicate."""
    return dict(zip(CONFLICT_FIELDS, _CONFLICT_VALUES(event), strict=True))


def tier_one_key(event: UsageRow) -> TierOneKey:
    """The key an identical re-send meets forever: (tenant_id, occurred_at, gateway_request_id)."""
    return (event.tenant_id, event.occurred_at, event.gateway_request_id)


class IdPlan(NamedTuple):
    """What a chunk does with one id: its copies not expired (in batch order), the fields they
    are judged against (None: the copy to store, computed only when another copy needs it),
    and the copy to store (None: none is)."""

    copies: list[tuple[Record, UsageRow]]
    truth: Mapping[str, Any] | None
    to_store: UsageRow | None = None


@dataclass
class ChunkPlan:
    ids: dict[str, IdPlan] = field(default_factory=dict)
    expired: list[DeadLetter] = field(default_factory=list)
    # Rows stored under the Tier 1 keys the chunk names: a copy identical to one is a duplicate
    # whatever else the window says (an old id re-used by another event since).
    stored: Mapping[TierOneKey, Mapping[str, Any]] = field(default_factory=dict)
    to_store: list[UsageRow] = field(default_factory=list)  # every copy to store
    new_in_window: list[UsageRow] = field(default_factory=list)  # those the window lacks

    def plan(self, gateway_request_id: str, plan: IdPlan, *, new_in_window: bool = False) -> None:
        self.ids[gateway_request_id] = plan
        if plan.to_store is not None:
            self.to_store.append(plan.to_store)
            if new_in_window:
                self.new_in_window.append(plan.to_store)

    def replan(self, again: ChunkPlan) -> None:
        """Take `again`'s decisions for its ids (planned anew after a lost race)."""
        self.ids.update(again.ids)
        self.to_store = [p.to_store for p in self.ids.values() if p.to_store is not None]
        self.new_in_window = []


def lookup_keys(batch: DecodedBatch) -> list[TierOneKey]:
    """Every distinct Tier 1 key the batch's copies name (usually one an id)."""
    return list(
        dict.fromkeys(tier_one_key(e) for found in batch.occurrences.values() for _, e in found)
    )


def _equal(truth: Mapping[str, Any] | None, event: UsageRow) -> bool | None:
    # Both sides are typed values (as stored, or as decoded): plain equality is the rule of
    # `conflicting_fields` (decimals by value, times as instants), at C speed.
    return None if truth is None else _TRUTH_VALUES(truth) == _CONFLICT_VALUES(event)


def plan_chunk(
    batch: DecodedBatch, known: KnownIdentities, *, retention_floor: date | None
) -> ChunkPlan:
    """Decide, for every id of the batch, which copy (if any) is stored.

    With a window row, the truth is that row: the first copy equal to it is stored unless its
    Tier 1 key is stored already. Without one, a copy whose Tier 1 key is stored meets that row
    (an event older than the window); else the first copy is the first ever, and the window
    learns the id. A copy of a month past retention is `expired`, whatever else.
    """
    plan = ChunkPlan(stored=known.stored)
    floor = _floor_instant(retention_floor)
    window_rows, stored_rows = known.window, known.stored
    for gateway_request_id, found in batch.occurrences.items():
        live = found
        if floor is not None and (
            found[0][1].occurred_at < floor  # one copy, nearly always: no generator
            if len(found) == 1
            else any(event.occurred_at < floor for _, event in found)
        ):
            live = _not_expired(found, floor, retention_floor, plan.expired)
            if not live:
                continue
        window = window_rows.get(gateway_request_id) if window_rows else None
        if window is not None:
            equal = next((e for _, e in live if _equal(window, e)), None)
            if equal is None:
                plan.plan(gateway_request_id, IdPlan(live, window))
                continue
            stored = stored_rows.get(tier_one_key(equal))
            verdict = identity_of(window_equal=True, stored_equal=_equal(stored, equal))
            store = equal if verdict is Identity.FIRST_SEEN_ELSEWHERE else None
            plan.plan(gateway_request_id, IdPlan(live, window, store))
            continue
        if stored_rows:
            stored_copy = next((e for _, e in live if tier_one_key(e) in stored_rows), None)
            if stored_copy is not None:
                plan.plan(gateway_request_id, IdPlan(live, stored_rows[tier_one_key(stored_copy)]))
                continue
        plan.plan(gateway_request_id, IdPlan(live, None, live[0][1]), new_in_window=True)
    return plan


def _floor_instant(retention_floor: date | None) -> datetime | None:
    """The retention floor as an instant (UTC midnight); None when nothing is expired."""
    if retention_floor is None or retention_floor == date.min:
        return None
    return datetime.combine(retention_floor, time(), tzinfo=UTC)


def _not_expired(
    found: list[tuple[Record, UsageRow]],
    floor: datetime,
    retention_floor: date | None,
    expired: list[DeadLetter],
) -> list[tuple[Record, UsageRow]]:
    live = []
    for record, event in found:
        if is_expired(event.occurred_at, retention_floor):
            detail = (
                f"occurred_at {event.occurred_at.isoformat()} is in a month past retention "
                f"(the oldest month kept starts {retention_floor}); it can no longer be stored"
            )
            expired.append(DeadLetter(record, DeadLetterReason.EXPIRED, detail))
        else:
            live.append((record, event))
    return live


def settle_batch(batch: DecodedBatch, plan: ChunkPlan, *, inserted: set[str]) -> BatchOutcome:
    """Classify every record once the database has answered (`inserted`: the ids whose planned
    copy was stored now).

    Each copy is judged against its id's truth: the copy stored now is recorded, an equal one (or
    one identical to the row stored under its own Tier 1 key) is a duplicate, any other a
    conflicting duplicate (dead-lettered, never written).
    """
    counts: Counter[BatchResult] = Counter()
    dead_letters = [*batch.rejected, *plan.expired]
    if dead_letters:
        counts[BatchResult.DEAD_LETTERED] = len(dead_letters)
    recorded = 0
    stored_rows = plan.stored
    for gateway_request_id, (copies, planned_truth, to_store) in plan.ids.items():
        stored_now = to_store if gateway_request_id in inserted else None
        if stored_now is not None and len(copies) == 1:  # the common case: nothing to compare
            recorded += 1
            continue
        truth = planned_truth
        if truth is None:
            assert to_store is not None  # planned so: a first copy is its own truth
            truth = conflict_view(to_store)
        for record, event in copies:
            if event is stored_now:
                recorded += 1
                stored_now = None  # the same tuple twice in a batch is a duplicate the second time
                continue
            if stored_rows and _equal(stored_rows.get(tier_one_key(event)), event):
                counts[BatchResult.DUPLICATE] += 1
                continue
            if _equal(truth, event):
                counts[BatchResult.DUPLICATE] += 1
                continue
            differing = conflicting_fields(truth, conflict_view(event))
            counts[BatchResult.CONFLICT] += 1
            detail = (
                f"gateway_request_id {gateway_request_id!r} is already known with a different "
                + ", ".join(differing)
            )
            dead_letters.append(DeadLetter(record, DeadLetterReason.CONFLICTING_DUPLICATE, detail))
    if recorded:
        counts[BatchResult.RECORDED] = recorded
    return BatchOutcome(counts, dead_letters)
