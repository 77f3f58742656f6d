"""Planning and settling a batch: recorded, duplicate, conflicting or expired, decided from what
the two tiers of the identity hold (the window's row, the row stored under a Tier 1 key)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from aiokafka.structs import ConsumerRecord

from llm_usage.consumers.usage.settle import (
    ChunkPlan,
    DecodedBatch,
    conflict_view,
    decode_batch,
    plan_chunk,
    settle_batch,
    tier_one_key,
)
from llm_usage.runtime.handler import BatchOutcome
from llm_usage.runtime.pricing import PriceSnapshot
from llm_usage.schemas.dead_letter import DeadLetterReason
from llm_usage.storage.event_ids import KnownIdentities
from tests.records import consumer_record

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


NO_PRICES = PriceSnapshot()


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


def plan(
    batch: DecodedBatch, known: KnownIdentities | None = None, floor: date | None = None
) -> ChunkPlan:
    return plan_chunk(batch, known or KnownIdentities(), retention_floor=floor)


def land(batch: DecodedBatch, known: KnownIdentities | None = None) -> BatchOutcome:
    """Settle as if every planned copy was stored."""
    chunk = plan(batch, known)
    return settle_batch(batch, chunk, inserted={e.gateway_request_id for e in chunk.to_store})


def stored_as(data: bytes) -> dict[str, Any]:
    """The conflict fields of `data` as PostgreSQL gives them back."""
    return conflict_view(
        decode_batch([record(data, 0)], now=NOW, prices=NO_PRICES).first_occurrences()[0]
    )


def test_first_occurrence_is_recorded_and_exact_repeats_are_duplicates() -> None:
    batch = decode_batch([record(event(), 0), record(event(), 1)], now=NOW, prices=NO_PRICES)
    chunk = plan(batch)
    assert [e.gateway_request_id for e in chunk.new_in_window] == ["r1"]
    outcome = land(batch)
    assert outcome.counts == {"recorded": 1, "duplicate": 1}
    assert outcome.dead_letters == []


def test_repeat_with_other_values_in_the_same_batch_is_a_conflict() -> None:
    conflicting = record(event(input_tokens=11), 1)
    batch = decode_batch([record(event(), 0), conflicting], now=NOW, prices=NO_PRICES)
    outcome = land(batch)
    assert outcome.counts == {"recorded": 1, "conflict": 1}
    [letter] = outcome.dead_letters
    assert letter.record is conflicting
    assert letter.reason is DeadLetterReason.CONFLICTING_DUPLICATE
    assert "input_tokens" in letter.detail


def test_an_id_in_the_window_is_judged_against_the_window_not_the_batch() -> None:
    window = stored_as(event())
    window["customer_charge_usd"] = Decimal("0.5")  # numeric comes back without trailing 0
    batch = decode_batch(
        [record(event(output_tokens=6), 5), record(event(customer_charge_usd="0.5000"), 6)],
        now=NOW,
        prices=NO_PRICES,
    )
    chunk = plan(batch, KnownIdentities(window={"r1": window}))
    # The budget consumer saw it first: the equal copy is stored, the window is not added to.
    assert [e.customer_charge_usd for e in chunk.to_store] == [Decimal("0.5000")]
    assert chunk.new_in_window == []
    outcome = settle_batch(batch, chunk, inserted={"r1"})
    assert outcome.counts == {"recorded": 1, "conflict": 1}
    assert [letter.record.offset for letter in outcome.dead_letters] == [5]


def test_a_window_row_of_another_tenant_makes_every_copy_a_conflict() -> None:
    batch = decode_batch([record(event(), 0)], now=NOW, prices=NO_PRICES)
    chunk = plan(batch, KnownIdentities(window={"r1": stored_as(event(tenant_id="t2"))}))
    assert chunk.to_store == []
    outcome = settle_batch(batch, chunk, inserted=set())
    assert outcome.counts == {"conflict": 1}
    assert "tenant_id" in outcome.dead_letters[0].detail


def test_an_id_stored_and_already_in_the_window_is_a_duplicate() -> None:
    batch = decode_batch([record(event(), 0)], now=NOW, prices=NO_PRICES)
    [copy] = batch.first_occurrences()
    known = KnownIdentities(
        window={"r1": stored_as(event())}, stored={tier_one_key(copy): stored_as(event())}
    )
    outcome = settle_batch(batch, plan(batch, known), inserted=set())
    assert outcome.counts == {"duplicate": 1}


def test_past_the_window_the_tier_one_row_decides() -> None:
    # Stored long ago, forgotten by the window: an identical re-send meets its Tier 1 row.
    same, other_charge = record(event(), 0), record(event(customer_charge_usd="0.60"), 1)
    batch = decode_batch([same, other_charge], now=NOW, prices=NO_PRICES)
    [copy] = batch.first_occurrences()[:1]
    chunk = plan(batch, KnownIdentities(stored={tier_one_key(copy): stored_as(event())}))
    assert chunk.to_store == []
    assert chunk.new_in_window == []
    outcome = settle_batch(batch, chunk, inserted=set())
    assert outcome.counts == {"duplicate": 1, "conflict": 1}
    assert [letter.record for letter in outcome.dead_letters] == [other_charge]


def test_an_event_of_a_month_past_retention_is_expired_and_nothing_else() -> None:
    old = record(event(gateway_request_id="r0", occurred_at="2024-10-31T23:59:59Z"), 0)
    batch = decode_batch([old, record(event(), 1)], now=NOW, prices=NO_PRICES)
    chunk = plan(batch, floor=date(2024, 11, 1))
    outcome = settle_batch(batch, chunk, inserted={e.gateway_request_id for e in chunk.to_store})
    assert outcome.counts == {"recorded": 1, "dead_lettered": 1}
    [letter] = outcome.dead_letters
    assert (letter.record, letter.reason) == (old, DeadLetterReason.EXPIRED)
    assert "2024-11-01" in letter.detail


def test_rejected_records_become_dead_letters_and_do_not_block_the_rest() -> None:
    batch = decode_batch(
        [record(b"{not json", 0), record(event(), 1), record(None, 2), record(b"[]", 3)],
        now=NOW,
        prices=NO_PRICES,
    )
    outcome = land(batch)
    assert outcome.counts == {"recorded": 1, "dead_lettered": 3}
    reasons = [(letter.record.offset, letter.reason) for letter in outcome.dead_letters]
    assert reasons == [
        (0, DeadLetterReason.INVALID_JSON),
        (2, DeadLetterReason.INVALID_JSON),
        (3, DeadLetterReason.SCHEMA_VIOLATION),
    ]
