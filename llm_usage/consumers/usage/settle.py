"""Pure decisions of the usage consumer: decode a batch, then settle it against what was stored."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from llm_usage.core.errors import TransientError
from llm_usage.runtime.handler import BatchOutcome, BatchResult, DeadLetter, Record
from llm_usage.schemas.dead_letter import DeadLetterReason, Rejection
from llm_usage.schemas.decoding import decode_usage_event
from llm_usage.schemas.usage_event import CONFLICT_FIELDS, UsageRow, conflicting_fields


@dataclass
class DecodedBatch:
    """A batch after decoding: valid events grouped by id (first seen first), and the rejects."""

    occurrences: dict[str, list[tuple[Record, UsageRow]]] = field(default_factory=dict)
    rejected: list[DeadLetter] = field(default_factory=list)

    def first_occurrences(self) -> list[UsageRow]:
        """One event per id: the one to try to insert."""
        return [found[0][1] for found in self.occurrences.values()]


class StoredRowVanishedError(TransientError):
    """A row the batch relied on was gone by the time it was settled: land the batch again."""


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


def settle_batch(
    batch: DecodedBatch,
    *,
    inserted: set[str],
    stored: Mapping[str, Mapping[str, Any]],
) -> BatchOutcome:
    """Classify every occurrence once the database has answered.

    For each id the truth is what is stored: the batch's first occurrence if it was inserted now,
    otherwise the row stored before. Every other occurrence is a duplicate when it agrees with the
    truth and a conflicting duplicate (dead-lettered, never written) when it does not.
    """
    counts: Counter[BatchResult] = Counter()
    dead_letters = list(batch.rejected)
    if batch.rejected:
        counts[BatchResult.DEAD_LETTERED] = len(batch.rejected)
    recorded = 0
    for gateway_request_id, found in batch.occurrences.items():
        if gateway_request_id in inserted:
            recorded += 1
            if len(found) == 1:  # the common case: nothing to compare
                continue
            truth: Mapping[str, Any] = conflict_view(found[0][1])
            others = found[1:]
        else:
            if gateway_request_id not in stored:
                raise StoredRowVanishedError(
                    f"{gateway_request_id!r} was neither inserted nor found stored; "
                    "was it deleted while the batch was written? landing the batch again"
                )
            truth = stored[gateway_request_id]
            others = found
        for record, event in others:
            differing = conflicting_fields(truth, conflict_view(event))
            if not differing:
                counts[BatchResult.DUPLICATE] += 1
                continue
            counts[BatchResult.CONFLICT] += 1
            detail = (
                f"gateway_request_id {gateway_request_id!r} is already stored with a different "
                + ", ".join(differing)
            )
            dead_letters.append(DeadLetter(record, DeadLetterReason.CONFLICTING_DUPLICATE, detail))
    if recorded:
        counts[BatchResult.RECORDED] = recorded
    return BatchOutcome(counts, dead_letters)
