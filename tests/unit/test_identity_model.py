"""The two-tier identity as a model (no database): whatever the re-send delays, the changed fields,
the window and the retention, an event is stored at most once per Tier 1 key, an identical copy
is a duplicate however late it comes, and every other copy that differs from the first one
within the window is a conflict."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from llm_usage.consumers.usage.settle import (
    conflict_view,
    decode_batch,
    plan_chunk,
    settle_batch,
    tier_one_key,
)
from llm_usage.runtime.pricing import PriceSnapshot
from llm_usage.schemas.usage_event import conflicting_fields
from llm_usage.storage.event_ids import KnownIdentities
from tests.records import consumer_record

START = datetime(2026, 3, 1, tzinfo=UTC)  # the model's own clock: no real date is involved
DECODED_AT = datetime(2027, 1, 1, tzinfo=UTC)  # after every event the model makes


@dataclass
class Tiers:
    window: dict[str, tuple[dict[str, Any], datetime]] = field(default_factory=dict)
    stored: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)

    def prune(self, now: datetime, window: timedelta) -> None:
        for request_id, (_, seen) in list(self.window.items()):
            if seen < now - window:
                del self.window[request_id]


send = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["a", "b", "c"]),
        "tenant": st.sampled_from(["t1", "t2"]),
        "month": st.integers(0, 3),  # months after START the event occurred in
        "charge": st.sampled_from(["0.10", "0.1", "0.20"]),
        "after_hours": st.integers(0, 400),  # since the previous send
    }
)


@settings(max_examples=300, deadline=None)
@given(
    sends=st.lists(send, min_size=1, max_size=12),
    window_hours=st.integers(1, 300),
    floor_month=st.integers(0, 2),
)
def test_two_tiers(sends: list[dict[str, Any]], window_hours: int, floor_month: int) -> None:
    tiers = Tiers()
    window = timedelta(hours=window_hours)
    floor = date(2026, 3 + floor_month, 1)
    now = START
    for offset, sent in enumerate(sends):
        now += timedelta(hours=sent["after_hours"])
        tiers.prune(now, window)
        occurred = datetime(2026, 3 + sent["month"], 1, 12, tzinfo=UTC)
        data = {
            "gateway_request_id": sent["id"],
            "tenant_id": sent["tenant"],
            "customer_charge_usd": sent["charge"],
            "occurred_at": occurred.isoformat(),
        }
        batch = decode_batch(
            [consumer_record(json.dumps(data).encode(), offset=offset)],
            now=DECODED_AT,
            prices=PriceSnapshot(),
        )
        [copy] = batch.first_occurrences()
        key = tier_one_key(copy)
        known = KnownIdentities(
            window={i: fields for i, (fields, _) in tiers.window.items() if i == sent["id"]},
            stored={k: v for k, v in tiers.stored.items() if k == key},
        )
        plan = plan_chunk(batch, known, retention_floor=floor)
        to_store = plan.to_store
        outcome = settle_batch(
            batch, plan, inserted={e.gateway_request_id for e in to_store}
        ).counts
        view = conflict_view(copy)

        if occurred.date() < floor:
            assert outcome == {"dead_lettered": 1}, "a month past retention is expired"
            continue
        in_window = tiers.window.get(sent["id"])
        if key in tiers.stored and not conflicting_fields(tiers.stored[key], view):
            assert outcome == {"duplicate": 1}, "an identical copy is a duplicate, forever"
        elif in_window is not None and conflicting_fields(in_window[0], view):
            assert outcome == {"conflict": 1}, "a differing copy within the window conflicts"
        for event in to_store:
            assert tier_one_key(event) not in tiers.stored, "stored twice under one key"
            tiers.stored[tier_one_key(event)] = conflict_view(event)
        for event in plan.new_in_window:
            tiers.window[event.gateway_request_id] = (conflict_view(event), now)
        assert sum(outcome.values()) == 1
