"""What a batch handler is, and what it reports back about a batch."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, TypeAlias

from aiokafka.structs import ConsumerRecord

from llm_usage.schemas.dead_letter import DeadLetterReason

# aiokafka ships no types: a record is whatever its ConsumerRecord is (bytes key and value).
Record: TypeAlias = ConsumerRecord


class BatchResult(StrEnum):
    """What became of one record; also the `result` label of the events metric."""

    RECORDED = "recorded"  # a new row was stored
    DUPLICATE = "duplicate"  # known and equal: nothing changed
    CONFLICT = "conflict"  # known with different values: dead-lettered, the stored row stays
    DEAD_LETTERED = "dead_lettered"  # not stored; on the dead-letter topic with the reason
    REFUSED_BY_DATABASE = "refused_by_database"  # valid, but PostgreSQL refused the row
    REJECTED = "rejected"  # invalid, skipped by a consumer without a dead-letter topic


@dataclass(frozen=True)
class DeadLetter:
    """A consumed record that will not be stored, and why."""

    record: Record
    reason: DeadLetterReason
    detail: str


@dataclass
class BatchOutcome:
    """What the handler did with a batch: counts by result, and what must be dead-lettered."""

    counts: Counter[BatchResult] = field(default_factory=Counter)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def merge(self, other: BatchOutcome) -> BatchOutcome:
        return BatchOutcome(self.counts + other.counts, self.dead_letters + other.dead_letters)


class BatchHandler(Protocol):
    """Lands a batch in one database transaction; safe to call again with the same records."""

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome: ...
