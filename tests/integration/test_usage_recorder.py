"""The usage consumer's batch handler against a real PostgreSQL (no Kafka needed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

import llm_usage.consumers.usage
import llm_usage.storage.usage_events
from llm_usage.consumers.runtime.outcome import Record
from llm_usage.consumers.usage import UsageRecorder
from tests.integration.pipeline import stored_for, unique, usage_event
from tests.records import consumer_record

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def records(events: list[dict[str, Any]]) -> list[Record]:
    return [
        consumer_record(json.dumps(event).encode(), offset=offset, key=None)
        for offset, event in enumerate(events)
    ]


async def test_rows_hold_exactly_what_the_gateway_sent(pool: asyncpg.Pool) -> None:
    event = usage_event(
        unique("tenant"),
        deployment_id=None,
        customer_charge_usd="12345678901.234567891",
        upstream_cost_usd="0.000000000000000001",
        occurred_at="2026-11-14T14:42:03.5+05:30",
        cached_input_tokens=7,
    )
    outcome = await UsageRecorder(pool=pool, clock=lambda: NOW).record_batch(records([event]))
    assert outcome.counts == {"recorded": 1}
    [row] = await stored_for(pool, [event["gateway_request_id"]])
    assert row["customer_charge_usd"] == Decimal("12345678901.234567891")
    assert str(row["upstream_cost_usd"]) == "1E-18"
    assert row["occurred_at"] == datetime(2026, 11, 14, 9, 12, 3, 500000, tzinfo=UTC)
    assert row["deployment_id"] is None
    assert row["total_tokens"] == event["input_tokens"] + event["output_tokens"]
    assert row["cached_input_tokens"] == 7
    assert row["received_at"] is not None


async def test_lost_race_with_another_replica_falls_back_to_insert_on_conflict(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = unique("tenant")
    theirs = usage_event(tenant)
    conflicting = {**theirs, "output_tokens": theirs["output_tokens"] + 1}
    mine = [usage_event(tenant) for _ in range(3)]
    # Another replica stores `theirs` first ...
    await UsageRecorder(pool=pool, clock=lambda: NOW).record_batch(records([theirs]))

    # ... but our look-up ran before its commit, so it found nothing stored.
    real_lookup = llm_usage.storage.usage_events.stored_conflict_fields
    lookups: list[int] = []

    async def lookup_that_lost_the_race(
        connection: Any, ids: list[str]
    ) -> dict[str, dict[str, Any]]:
        lookups.append(len(ids))
        return {} if len(lookups) == 1 else await real_lookup(connection, ids)

    monkeypatch.setattr(
        llm_usage.consumers.usage, "stored_conflict_fields", lookup_that_lost_the_race
    )
    batch = records([*mine[:2], conflicting, mine[2]])
    outcome = await UsageRecorder(pool=pool, clock=lambda: NOW).record_batch(batch)

    assert outcome.counts == {"recorded": 3, "conflict": 1}
    assert [letter.record.offset for letter in outcome.dead_letters] == [2]
    assert len(lookups) >= 2, "after losing the race the batch must be landed again"
    stored = await stored_for(pool, [e["gateway_request_id"] for e in [theirs, *mine]])
    assert len(stored) == 4
    [kept] = [row for row in stored if row["gateway_request_id"] == theirs["gateway_request_id"]]
    assert kept["output_tokens"] == theirs["output_tokens"]


async def test_duplicates_and_conflicts_across_chunks_of_one_batch(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    first, second = usage_event(tenant), usage_event(tenant)
    conflicting = {**first, "deployment_id": "another-deployment"}
    # Chunks of two: the repeat and the conflict arrive in later chunks than the originals.
    batch = records([first, second, first, usage_event(tenant), conflicting, second])
    recorder = UsageRecorder(pool=pool, clock=lambda: NOW, chunk_records=2)
    outcome = await recorder.record_batch(batch)
    assert outcome.counts == {"recorded": 3, "duplicate": 2, "conflict": 1}
    assert [(letter.record.offset, letter.reason.value) for letter in outcome.dead_letters] == [
        (4, "conflicting_duplicate")
    ]
    [row] = await stored_for(pool, [first["gateway_request_id"]])
    assert row["deployment_id"] == first["deployment_id"]
