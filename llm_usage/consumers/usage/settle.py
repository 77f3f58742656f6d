"""Pure decisions of the usage consumer: decode a batch, plan each id against the two tiers of
its identity (domain/identity.py), then settle every record once the database has answered."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from llm_usage.domain.identity import Identity, identity_of, is_expired
from llm_usage.runtime.handler import BatchOutcome, BatchResult, DeadLetter, Record
from llm_usage.schemas.dead_letter import DeadLetterReason, Rejection
from llm_usage.schemas.decoding import decode_usage_event
from llm_usage.schemas.usage_event import CONFLICT_FIELDS, UsageRow, conflicting_fields
from llm_usage.storage.event_ids import KnownIdentities, TierOneKey


@dataclass
class DecodedBatch:
    """A batch after decoding: valid events grouped by id (first seen first), and the rejects."""

    occurrences: dict[str, list[tuple[Record, UsageRow]]] = field(default_factory=dict)
    rejected: list[DeadLetter] = field(default_factory=list)

    def first_occurrences(self) -> list[UsageRow]:
        """One event per id: the one to try to insert."""
        return [found[0][1] for found in self.occurrences.values()]


def decode_batch(
    records: Sequence[Record], *, now: datetime, into: DecodedBatch | None = None
) -> DecodedBatch:
    """Decode every record (adding to `into`, if given); a record that breaks a rule becomes a
    dead letter, never an error."""
    batch = DecodedBatch() if into is None else into
    for record in records:
        decoded = decode_usage_event(record.value, now=now)
        if isinstance(decoded, Rejection):
            batch.rejected.append(DeadLetter(record, decoded.reason, decoded.detail))
        else:
            batch.occurrences.setdefault(decoded.gateway_request_id, []).append((record, decoded))
    return batch


_CONFLICT_VALUES = operator.attrgetter(*CONFLICT_FIELDS)


def conflict_view(event: UsageRow) -> dict[str, Any]:
    """The fields of `event` that must match the stored row for it to be a plain duplicate."""
    return dict(zip(CONFLICT_FIELDS, _CONFLICT_VALUES(event), strict=True))


def tier_one_key(event: UsageRow) -> TierOneKey:
    """The key an identical re-send meets forever: (tenant_id, occurred_at, gateway_request_id)."""
    return (event.tenant_id, event.occurred_at, event.gateway_request_id)


@dataclass(frozen=True)
class IdPlan:
    """What a chunk does with one id: the fields its copies are judged against, and the copy to
    store (None: none is stored), and whether the window must learn the id."""

    copies: list[tuple[Record, UsageRow]]  # the id's records not expired, in batch order
    truth: Mapping[str, Any]
    to_store: UsageRow | None = None
    new_in_window: bool = False


@dataclass
class ChunkPlan:
    ids: dict[str, IdPlan] = field(default_factory=dict)
    expired: list[DeadLetter] = field(default_factory=list)
    # Rows stored under the Tier 1 keys the chunk names: a copy identical to one is a duplicate
    # whatever else the window says (an old id re-used by another event since).
    stored: Mapping[TierOneKey, Mapping[str, Any]] = field(default_factory=dict)

    def to_store(self) -> list[UsageRow]:
        return [plan.to_store for plan in self.ids.values() if plan.to_store is not None]

    def new_in_window(self) -> list[UsageRow]:
        return [
            plan.to_store
            for plan in self.ids.values()
            if plan.new_in_window and plan.to_store is not None
        ]


def lookup_keys(batch: DecodedBatch) -> list[TierOneKey]:
    """Every distinct Tier 1 key the batch's copies name (usually one an id)."""
    return list(
        dict.fromkeys(tier_one_key(e) for found in batch.occurrences.values() for _, e in found)
    )


def _equal(truth: Mapping[str, Any] | None, event: UsageRow) -> bool | None:
    return None if truth is None else not conflicting_fields(truth, conflict_view(event))


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
    for gateway_request_id, found in batch.occurrences.items():
        live: list[tuple[Record, UsageRow]] = []
        for record, event in found:
            if is_expired(event.occurred_at, retention_floor):
                detail = (
                    f"occurred_at {event.occurred_at.isoformat()} is in a month past retention "
                    f"(the oldest month kept starts {retention_floor}); it can no longer be stored"
                )
                plan.expired.append(DeadLetter(record, DeadLetterReason.EXPIRED, detail))
            else:
                live.append((record, event))
        if not live:
            continue
        copies = [event for _, event in live]
        window = known.window.get(gateway_request_id)
        if window is not None:
            equal = next((e for e in copies if _equal(window, e)), None)
            if equal is None:
                plan.ids[gateway_request_id] = IdPlan(live, window)
                continue
            stored = known.stored.get(tier_one_key(equal))
            verdict = identity_of(window_equal=True, stored_equal=_equal(stored, equal))
            store = equal if verdict is Identity.FIRST_SEEN_ELSEWHERE else None
            plan.ids[gateway_request_id] = IdPlan(live, window, store)
            continue
        stored_copy = next((e for e in copies if tier_one_key(e) in known.stored), None)
        if stored_copy is not None:
            plan.ids[gateway_request_id] = IdPlan(live, known.stored[tier_one_key(stored_copy)])
            continue
        first = copies[0]
        plan.ids[gateway_request_id] = IdPlan(live, conflict_view(first), first, new_in_window=True)
    return plan


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
    for gateway_request_id, id_plan in plan.ids.items():
        stored_now = id_plan.to_store if gateway_request_id in inserted else None
        for record, event in id_plan.copies:
            if event is stored_now:
                counts[BatchResult.RECORDED] += 1
                stored_now = None  # the same tuple twice in a batch is a duplicate the second time
                continue
            if _equal(plan.stored.get(tier_one_key(event)), event):
                counts[BatchResult.DUPLICATE] += 1
                continue
            differing = conflicting_fields(id_plan.truth, conflict_view(event))
            if not differing:
                counts[BatchResult.DUPLICATE] += 1
                continue
            counts[BatchResult.CONFLICT] += 1
            detail = (
                f"gateway_request_id {gateway_request_id!r} is already known with a different "
                + ", ".join(differing)
            )
            dead_letters.append(DeadLetter(record, DeadLetterReason.CONFLICTING_DUPLICATE, detail))
    return BatchOutcome(counts, dead_letters)
