"""The usage consumer's batch handler against a real PostgreSQL (no Kafka needed)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import structlog

from llm_usage.consumers.usage.recorder import LANDING_AGAIN, UsageRecorder
from llm_usage.runtime.handler import BatchOutcome, Record
from llm_usage.schemas.decoding import decode_usage_event
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.usage_events import insert_new_usage_events
from tests import clock
from tests.integration.pipeline import (
    sessions_blocked_by,
    stored_for,
    unique,
    usage_event,
    wait_until,
)
from tests.records import consumer_record


def records(events: list[dict[str, Any]]) -> list[Record]:
    return [
        consumer_record(json.dumps(event).encode(), offset=offset, key=None)
        for offset, event in enumerate(events)
    ]


async def test_rows_hold_exactly_what_the_gateway_sent(pool: asyncpg.Pool) -> None:
    yesterday = clock.today() - timedelta(days=1)
    event = usage_event(
        unique("tenant"),
        deployment_id=None,
        customer_charge_usd="12345678901.234567891",
        upstream_cost_usd="0.000000000000000001",
        occurred_at=f"{yesterday}T14:42:03.5+05:30",
        cached_input_tokens=7,
    )
    outcome = await UsageRecorder(pool=pool, clock=clock.now).record_batch(records([event]))
    assert outcome.counts == {"recorded": 1}
    [row] = await stored_for(pool, [event["gateway_request_id"]])
    assert row["customer_charge_usd"] == Decimal("12345678901.234567891")
    assert str(row["upstream_cost_usd"]) == "1E-18"
    assert row["occurred_at"] == datetime.combine(yesterday, time(9, 12, 3, 500000), UTC)
    assert row["deployment_id"] is None
    assert row["total_tokens"] == event["input_tokens"] + event["output_tokens"]
    assert row["cached_input_tokens"] == 7
    assert row["received_at"] is not None


@pytest.fixture
def captured_logs() -> Iterator[structlog.testing.LogCapture]:
    """Every structlog entry, whatever level an earlier test configured, as dicts."""
    capture = structlog.testing.LogCapture()
    saved = structlog.get_config()
    structlog.configure(
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture
    finally:
        structlog.configure(**saved)


@pytest.mark.parametrize("theirs_and_ours", ["duplicate", "conflict"])
async def test_lost_race_with_another_replica_falls_back_to_insert_on_conflict(
    pool: asyncpg.Pool,
    database_url: str,
    captured_logs: structlog.testing.LogCapture,
    theirs_and_ours: str,
) -> None:
    tenant = unique("tenant")
    theirs = usage_event(tenant)
    ours = (
        theirs
        if theirs_and_ours == "duplicate"
        else {**theirs, "output_tokens": theirs["output_tokens"] + 1}
    )
    mine = [usage_event(tenant) for _ in range(3)]
    batch = records([*mine[:2], ours, mine[2]])
    stored_by_them = decode_usage_event(json.dumps(theirs).encode(), now=clock.now())
    assert isinstance(stored_by_them, UsageRow)

    # Another replica inserts `theirs` in a transaction it has not committed yet.
    other: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(database_url)
    landing: asyncio.Task[BatchOutcome] | None = None
    try:
        other_pid = int(await other.fetchval("SELECT pg_backend_pid()"))
        their_transaction = other.transaction()
        await their_transaction.start()
        assert await insert_new_usage_events(other, [stored_by_them]) == {
            theirs["gateway_request_id"]
        }

        # Our look-up cannot see that row, so the id goes into our COPY, which must wait for
        # the other transaction's unique key.
        recorder = UsageRecorder(pool=pool, clock=clock.now)
        landing = asyncio.create_task(recorder.record_batch(batch))

        async def our_copy_waits_for_theirs() -> bool:
            return await sessions_blocked_by(pool, other_pid, application_name=None) > 0

        await wait_until(our_copy_waits_for_theirs, within=30, message="our COPY never waited")
        assert not landing.done()
        assert not [e for e in captured_logs.entries if e["event"] == LANDING_AGAIN]

        await their_transaction.commit()  # they win the race
        outcome = await asyncio.wait_for(landing, timeout=60)
    finally:
        if landing is not None and not landing.done():
            landing.cancel()
        await other.close()

    # The COPY failed on their committed row, the transaction rolled back, and the batch
    # landed again with INSERT ... ON CONFLICT, settling `ours` against their row.
    assert [e["event"] for e in captured_logs.entries].count(LANDING_AGAIN) == 1
    assert outcome.counts == {"recorded": 3, theirs_and_ours: 1}
    assert [letter.record.offset for letter in outcome.dead_letters] == (
        [2] if theirs_and_ours == "conflict" else []
    )
    stored = await stored_for(pool, [e["gateway_request_id"] for e in [theirs, *mine]])
    assert sorted(row["gateway_request_id"] for row in stored) == sorted(
        e["gateway_request_id"] for e in [theirs, *mine]
    )
    [kept] = [row for row in stored if row["gateway_request_id"] == theirs["gateway_request_id"]]
    assert kept["output_tokens"] == theirs["output_tokens"]


async def test_duplicates_and_conflicts_across_chunks_of_one_batch(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    first, second = usage_event(tenant), usage_event(tenant)
    conflicting = {**first, "deployment_id": "another-deployment"}
    # Chunks of two: the repeat and the conflict arrive in later chunks than the originals.
    batch = records([first, second, first, usage_event(tenant), conflicting, second])
    recorder = UsageRecorder(pool=pool, clock=clock.now, chunk_records=2)
    outcome = await recorder.record_batch(batch)
    assert outcome.counts == {"recorded": 3, "duplicate": 2, "conflict": 1}
    assert [(letter.record.offset, letter.reason.value) for letter in outcome.dead_letters] == [
        (4, "conflicting_duplicate")
    ]
    [row] = await stored_for(pool, [first["gateway_request_id"]])
    assert row["deployment_id"] == first["deployment_id"]


async def test_a_copy_of_an_event_stored_before_the_window_lands_again_and_is_a_duplicate(
    pool: asyncpg.Pool, captured_logs: structlog.testing.LogCapture
) -> None:
    # The fast path asks Tier 1 only about ids the window knows. An id the window has forgotten
    # is planned as new; its COPY then fails on the Tier 1 key, and landing again asks both.
    tenant = unique("tenant")
    old, fresh = usage_event(tenant), usage_event(tenant)
    recorder = UsageRecorder(pool=pool, clock=clock.now)
    assert (await recorder.record_batch(records([old]))).counts == {"recorded": 1}
    await pool.execute(
        "DELETE FROM usage_event_ids WHERE gateway_request_id = $1", old["gateway_request_id"]
    )
    assert not [e for e in captured_logs.entries if e["event"] == LANDING_AGAIN]

    outcome = await recorder.record_batch(records([fresh, old]))

    assert outcome.counts == {"recorded": 1, "duplicate": 1}
    assert [e["event"] for e in captured_logs.entries].count(LANDING_AGAIN) == 1
    stored = await stored_for(pool, [old["gateway_request_id"], fresh["gateway_request_id"]])
    assert len(stored) == 2
    # Landing again did not bring the forgotten id back into the window under the copy's name.
    window = await pool.fetch(
        "SELECT gateway_request_id FROM usage_event_ids WHERE tenant_id = $1", tenant
    )
    assert [r[0] for r in window] == [fresh["gateway_request_id"]]
