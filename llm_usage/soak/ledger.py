"""What the soak's load generator sent, as the checker needs it: the gateway's own record.

A valid event enters `events` once the broker acknowledged it (outside a transaction, or in a
transaction whose commit returned); its first version is what must be stored. Ids sent only in
transactions that were aborted are in `aborted_ids` and must never be stored or counted. Records
that deserve the dead-letter topic are known by the SHA-256 of their value bytes, with the reason
they deserve.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal


def value_digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()


@dataclass(frozen=True)
class SentEvent:
    """The first (and stored) version of a valid event, as the generator built it."""

    gateway_request_id: str
    tenant_id: str
    deployment_id: str | None
    user_id: str | None
    agent_id: str | None
    customer_charge_usd: Decimal
    input_tokens: int
    output_tokens: int
    occurred_at: datetime
    acked_at: float  # Unix time the broker acknowledged it (or its transaction committed)


@dataclass
class Ledger:
    events: dict[str, SentEvent] = field(default_factory=dict)
    aborted_ids: set[str] = field(default_factory=set)
    # SHA-256 of the record value -> the DLQ reason it deserves (`invalid_json`,
    # `schema_violation`, `conflicting_duplicate`, `too_large`).
    dead_letters: dict[str, str] = field(default_factory=dict)
    # How many records of each kind were published (acknowledged), for the report:
    # event, duplicate, reserialised_duplicate, late, conflicting, malformed,
    # transactional_committed, transactional_aborted, resent_after_error.
    sent: Counter[str] = field(default_factory=Counter)

    def record_event(self, event: SentEvent) -> None:
        """A valid event was acknowledged; a later acknowledgement of its id keeps the first."""
        self.events.setdefault(event.gateway_request_id, event)

    def expect_dead_letter(self, value: bytes, reason: str) -> None:
        self.dead_letters[value_digest(value)] = reason
