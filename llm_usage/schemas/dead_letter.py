"""Why a record goes to the dead-letter topic, and the headers that say so (docs/contract.md,
"Dead letters")."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum


class DeadLetterReason(StrEnum):
    """The `dlq.reason` header: the one reason a record was not stored."""

    INVALID_JSON = "invalid_json"
    SCHEMA_VIOLATION = "schema_violation"
    CONFLICTING_DUPLICATE = "conflicting_duplicate"
    TOO_LARGE = "too_large"
    EXPIRED = "expired"  # its month is past retention: no partition can hold it any more
    UNPRICED = "unpriced"  # no charge sent and no price in effect for its provider and model
    UNKNOWN_EVENT = "unknown_event"  # a correction whose event was not stored within the wait


REASON_HEADER = "dlq.reason"
DETAIL_HEADER = "dlq.detail"
TOPIC_HEADER = "dlq.topic"
PARTITION_HEADER = "dlq.partition"
OFFSET_HEADER = "dlq.offset"
FAILED_AT_HEADER = "dlq.failed_at"
# Set by `dlq replay` on what it republishes: the dead letter it came from.
REPLAYED_FROM_HEADER = "dlq.replayed_from"

DLQ_HEADER_NAMES = (
    REASON_HEADER,
    DETAIL_HEADER,
    TOPIC_HEADER,
    PARTITION_HEADER,
    OFFSET_HEADER,
    FAILED_AT_HEADER,
)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that will not be stored: the reason, and which field and why, for people."""

    reason: DeadLetterReason
    detail: str


def format_failed_at(failed_at: datetime) -> str:
    """`failed_at` as RFC 3339 in UTC with milliseconds and `Z`: `2026-11-14T09:12:03.120Z`."""
    if failed_at.utcoffset() is None:
        raise ValueError("failed_at must be timezone-aware; a naive time names no instant")
    utc = failed_at.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


def dead_letter_headers(
    *,
    reason: DeadLetterReason,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
    failed_at: datetime,
) -> list[tuple[str, bytes]]:
    """The Kafka headers of a dead letter, in the contract's order, every value UTF-8.

    A detail that cannot be encoded as it is (a lone surrogate copied from bad input) is escaped
    rather than raising: a dead letter must always be publishable.
    """
    return [
        (REASON_HEADER, DeadLetterReason(reason).value.encode()),
        (DETAIL_HEADER, detail.encode("utf-8", "backslashreplace")),
        (TOPIC_HEADER, topic.encode("utf-8", "backslashreplace")),
        (PARTITION_HEADER, str(partition).encode()),
        (OFFSET_HEADER, str(offset).encode()),
        (FAILED_AT_HEADER, format_failed_at(failed_at).encode()),
    ]
