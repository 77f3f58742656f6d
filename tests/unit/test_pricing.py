"""Pricing an event that sent no charge: the row in effect, the lead that keeps consumers
agreeing, replays, and the `unpriced` dead letter."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from llm_usage.domain.prices import PRICE_CHANGE_LEAD, Price, in_effect_for_event, new_price
from llm_usage.runtime.pricing import PriceSnapshot, is_replayed
from llm_usage.schemas.dead_letter import REPLAYED_FROM_HEADER, DeadLetterReason, Rejection
from llm_usage.schemas.decoding import decode_usage_event
from llm_usage.schemas.usage_event import UnpricedEvent, UsageRow
from tests.records import consumer_record

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
JAN = datetime(2026, 1, 1, tzinfo=UTC)


def price(effective_from: datetime, *, created_at: datetime | None = None, **rates: str) -> Price:
    values = {"input": "2.5", "output": "10"} | rates
    row = new_price(
        "openai",
        "gpt-4o",
        effective_from,
        **{name: Decimal(value) for name, value in values.items()},
    )
    return dataclasses.replace(row, created_at=created_at or effective_from - PRICE_CHANGE_LEAD)


def unpriced(**fields: Any) -> UnpricedEvent:
    data = {
        "gateway_request_id": "r1",
        "tenant_id": "acme",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 1000,
        "output_tokens": 200,
        "cached_input_tokens": 400,
        "occurred_at": (NOW - timedelta(hours=1)).isoformat(),
    } | fields
    decoded = decode_usage_event(json.dumps(data).encode(), now=NOW)
    assert isinstance(decoded, UnpricedEvent), decoded
    return decoded


def snapshot(*rows: Price) -> PriceSnapshot:
    return PriceSnapshot({("openai", "gpt-4o"): sorted(rows, key=lambda r: r.effective_from)})


def test_an_unpriced_event_is_priced_from_the_row_in_effect_and_marked_estimated() -> None:
    old, current = price(JAN, input="5", output="15"), price(NOW - timedelta(days=1))
    priced = snapshot(old, current).estimate(unpriced(), replayed=False)
    assert isinstance(priced, UsageRow)
    # 600 uncached and 400 cached input at 2.5, 200 output at 10, per million.
    assert priced.customer_charge_usd == Decimal("0.0045")
    assert priced.charge_estimated is True
    assert priced.price_effective_from == current.effective_from
    assert priced.gateway_request_id == "r1"


def test_no_row_in_effect_is_an_unpriced_dead_letter_naming_the_pair() -> None:
    later = price(NOW)
    refused = snapshot(later).estimate(unpriced(), replayed=False)
    assert isinstance(refused, Rejection)
    assert refused.reason is DeadLetterReason.UNPRICED
    assert "'openai'" in refused.detail
    assert "'gpt-4o'" in refused.detail


@pytest.mark.parametrize("missing", ["provider", "model"])
def test_without_provider_or_model_nothing_can_price_it(missing: str) -> None:
    refused = snapshot(price(JAN)).estimate(unpriced(**{missing: None}), replayed=False)
    assert isinstance(refused, Rejection)
    assert refused.reason is DeadLetterReason.UNPRICED


def test_more_cached_than_input_tokens_cannot_be_priced() -> None:
    refused = snapshot(price(JAN)).estimate(
        unpriced(input_tokens=10, cached_input_tokens=11), replayed=False
    )
    assert isinstance(refused, Rejection)
    assert refused.reason is DeadLetterReason.SCHEMA_VIOLATION
    assert "cached_input_tokens" in refused.detail


def test_a_backdated_first_row_prices_live_events_only_from_the_lead_after_it_was_added() -> None:
    added_at = NOW - timedelta(minutes=3)
    backdated = price(JAN, created_at=added_at)
    rows = [backdated]
    event_time = added_at + PRICE_CHANGE_LEAD
    assert in_effect_for_event(rows, event_time - timedelta(microseconds=1), replayed=False) is None
    assert in_effect_for_event(rows, event_time, replayed=False) == backdated
    # A replayed dead letter is priced from effective_from alone.
    assert in_effect_for_event(rows, JAN, replayed=True) == backdated


def test_a_replayed_record_is_recognised_by_the_header_dlq_replay_sets() -> None:
    plain = consumer_record(b"{}", offset=0)
    replayed = dataclasses.replace(plain, headers=((REPLAYED_FROM_HEADER, b"usage-dlq/0/7"),))
    assert (is_replayed(plain), is_replayed(replayed)) == (False, True)
    live_time = NOW - timedelta(hours=1)
    rows = snapshot(price(JAN, created_at=NOW - timedelta(minutes=1)))
    event = unpriced(occurred_at=live_time.isoformat())
    assert isinstance(rows.price(plain, event), Rejection)
    assert isinstance(rows.price(replayed, event), UsageRow)
