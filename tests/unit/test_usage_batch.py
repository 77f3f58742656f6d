"""Settling a batch: recorded, duplicate or conflicting, decided from what the database answered."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aiokafka.structs import ConsumerRecord

from llm_usage.consumers.usage.settle import conflict_view, decode_batch, settle_batch
from llm_usage.schemas.dead_letter import DeadLetterReason
from tests.records import consumer_record

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def record(value: bytes | None, offset: int) -> ConsumerRecord[bytes, bytes]:
    return consumer_record(value, offset=offset)


def event(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "gateway_request_id": "r1",
        "tenant_id": "t1",
        "input_tokens": 10,
        "output_tokens": 5,
        "customer_charge_usd": "0.50",
        "occurred_at": "2026-11-14T09:00:00Z",
    }
    return json.dumps({**base, **fields}).encode()


def test_first_occurrence_is_recorded_and_exact_repeats_are_duplicates() -> None:
    batch = decode_batch([record(event(), 0), record(event(), 1)], now=NOW)
    assert [e.gateway_request_id for e in batch.first_occurrences()] == ["r1"]
    outcome = settle_batch(batch, inserted={"r1"}, stored={})
    assert outcome.counts == {"recorded": 1, "duplicate": 1}
    assert outcome.dead_letters == []


def test_repeat_with_other_values_in_the_same_batch_is_a_conflict() -> None:
    conflicting = record(event(input_tokens=11), 1)
    batch = decode_batch([record(event(), 0), conflicting], now=NOW)
    outcome = settle_batch(batch, inserted={"r1"}, stored={})
    assert outcome.counts == {"recorded": 1, "conflict": 1}
    [letter] = outcome.dead_letters
    assert letter.record is conflicting
    assert letter.reason is DeadLetterReason.CONFLICTING_DUPLICATE
    assert "input_tokens" in letter.detail


def test_already_stored_id_is_compared_with_the_stored_row_not_the_batch() -> None:
    stored_view = conflict_view(decode_batch([record(event(), 0)], now=NOW).first_occurrences()[0])
    stored_view["customer_charge_usd"] = Decimal("0.5")  # numeric comes back without trailing 0
    batch = decode_batch(
        [record(event(customer_charge_usd="0.5000"), 5), record(event(output_tokens=6), 6)],
        now=NOW,
    )
    outcome = settle_batch(batch, inserted=set(), stored={"r1": stored_view})
    assert outcome.counts == {"duplicate": 1, "conflict": 1}
    assert [letter.record.offset for letter in outcome.dead_letters] == [6]


def test_rejected_records_become_dead_letters_and_do_not_block_the_rest() -> None:
    batch = decode_batch(
        [record(b"{not json", 0), record(event(), 1), record(None, 2), record(b"[]", 3)], now=NOW
    )
    outcome = settle_batch(batch, inserted={"r1"}, stored={})
    assert outcome.counts == {"recorded": 1, "dead_lettered": 3}
    reasons = [(letter.record.offset, letter.reason) for letter in outcome.dead_letters]
    assert reasons == [
        (0, DeadLetterReason.INVALID_JSON),
        (2, DeadLetterReason.INVALID_JSON),
        (3, DeadLetterReason.SCHEMA_VIOLATION),
    ]
