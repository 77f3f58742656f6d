"""`llm-usage events void|amend|show` as a real process against a real broker and database: what
it publishes (decoded as the consumers decode it), what it shows once the consumers have applied
corrections (their rows written here directly), and every mistake one line and exit 2 with
nothing published."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest

from llm_usage.domain.corrections import Action, Correction
from llm_usage.schemas.decoding import decode_usage_topic_record
from tests import clock
from tests.api_support import api_client, bearer, token
from tests.integration.correction_support import (
    add_correction,
    as_stored,
    park_correction,
    set_effective,
    store_event,
    utc_text,
)
from tests.integration.pipeline import PipelineTopics, read_topic, topic_record_count, unique
from tests.integration.test_policies import Finished


async def events(topics: PipelineTopics, *args: str, **environment: str) -> Finished:
    """Run `python -m llm_usage events ARGS` with the test's topics and database to its end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_usage", "events", *args,
        env={**topics.environment(), **environment},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return Finished(process.returncode, out.decode(), err.decode())


def _one_line_and_exit_2(finished: Finished, words: str) -> None:
    """The command's own last word is one line saying `words`, never a traceback (Kafka's client
    may have logged its failed connections before it)."""
    assert finished.code == 2, finished
    assert "Traceback" not in finished.err, finished.err
    last = finished.err.splitlines()[-1]
    assert last.startswith("llm-usage: error: "), finished.err
    assert words in last, finished.err


async def test_amend_publishes_a_complete_correction_and_waits_for_the_ack(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant, agent_id="agent-1")
    # An earlier correction moved the deployment: the amend starts from it.
    moved = replace(as_stored(event), deployment_id="dep-7")
    await set_effective(pool, event, moved, winner="c-earlier")
    finished = await events(
        topics, "amend", "--id", event["gateway_request_id"], "--input-tokens", "2000",
        "--no-user", "--charge-usd", "0.00420", "--reason", "billed in the wrong unit",
        "--actor", "alice", "--json",
    )  # fmt: skip
    assert finished.code == 0, finished
    printed = json.loads(finished.out)
    # On the topic when the command returned: read without waiting for anything else.
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.usage) == 1
    [record] = await read_topic(topics.settings.kafka_bootstrap_servers, topics.usage, expected=1)
    assert record.key == tenant.encode()
    assert json.loads(record.value) == printed["event"]
    decoded = decode_usage_topic_record(record.value, now=clock.now())
    assert isinstance(decoded, Correction)
    assert decoded.correction_id == printed["correction_id"]
    assert (decoded.action, decoded.actor, decoded.reason) == (
        Action.AMEND, "alice", "billed in the wrong unit",
    )  # fmt: skip
    assert decoded.fields == {
        "deployment_id": "dep-7",
        "user_id": None,
        "agent_id": "agent-1",
        "input_tokens": 2000,
        "output_tokens": 300,
        "cached_input_tokens": 0,
        "reasoning_tokens": 0,
        "total_tokens": 2300,
        "customer_charge_usd": Decimal("0.00420"),
    }
    assert decoded.event_occurred_at == event["occurred_at"]
    assert abs(decoded.occurred_at - clock.now()) < timedelta(minutes=1)


async def test_void_prints_its_correction_id_and_defaults_the_actor_to_user_at_host(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    finished = await events(
        topics, "void", "--id", event["gateway_request_id"], "--tenant", tenant,
        "--correction-id", "c-void-1", "--reason", "test traffic",
    )  # fmt: skip
    assert finished.code == 0, finished
    assert finished.out.startswith("published correction c-void-1 (void of "), finished.out
    [record] = await read_topic(topics.settings.kafka_bootstrap_servers, topics.usage, expected=1)
    decoded = decode_usage_topic_record(record.value, now=clock.now())
    assert isinstance(decoded, Correction)
    assert (decoded.correction_id, decoded.action, decoded.fields) == ("c-void-1", "void", {})
    assert "@" in decoded.actor


async def test_show_prints_what_the_api_answers(pool: asyncpg.Pool, topics: PipelineTopics) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    start = clock.now() - timedelta(hours=1)
    await add_correction(
        pool, event, "c-1", action="amend", occurred_at=start, fields={"user_id": "user-9"}
    )
    await add_correction(pool, event, "c-2", action="void", occurred_at=start + timedelta(1))
    await set_effective(
        pool, event, replace(as_stored(event), user_id="user-9", voided=True), winner="c-2"
    )
    await park_correction(pool, tenant, event["gateway_request_id"], "c-3")
    shown = await events(topics, "show", "--id", event["gateway_request_id"], "--json")
    assert shown.code == 0, shown
    async with api_client(pool) as (client, _):
        answer = await client.get(
            f"/v1/usage-events/{event['gateway_request_id']}",
            headers=bearer(token("tenant-member", tenant)),
        )
    assert json.loads(shown.out) == answer.json()
    assert [c["correction_id"] for c in answer.json()["corrections"]] == ["c-1", "c-2"]

    text = await events(topics, "show", "--id", event["gateway_request_id"], "--tenant", tenant)
    assert text.code == 0, text
    lines = text.out.splitlines()
    assert lines[0].endswith(", VOIDED")
    assert lines[1].split() == ["FIELD", "STORED", "EFFECTIVE"]
    assert ["user_id", "user-1", "user-9"] in [line.split() for line in lines]
    assert "corrections, oldest first:" in lines
    assert lines[-1] == "a correction of it is published and waits to be applied"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["void", "--reason", "x"], "has no stored event"),
        (["amend", "--reason", "x", "--charge-usd", "a lot"], "--charge-usd"),
        (["amend", "--reason", "x", "--charge-usd", "1.00", "--charge-cents", "150"], "disagrees"),
        (["amend", "--reason", "x", "--user-id", "u" * 201], "--user-id"),
        (["void", "--reason", "x" * 1001], "--reason"),
        (["void", "--reason", "x", "--occurred-at", "2999-01-01T00:00:00Z"], "--occurred-at"),
        (["show"], "has no stored event"),
    ],
)
async def test_a_mistake_is_one_line_and_exit_2_with_nothing_published(
    topics: PipelineTopics, pool: asyncpg.Pool, args: list[str], words: str
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    wanted = (
        [unique("req"), "--tenant", tenant]
        if words == "has no stored event"
        else [event["gateway_request_id"]]
    )
    finished = await events(topics, args[0], "--id", *wanted, *args[1:])
    _one_line_and_exit_2(finished, words)
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.usage) == 0


async def test_an_id_outside_the_window_needs_its_tenant(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    await pool.execute(
        "DELETE FROM usage_event_ids WHERE gateway_request_id = $1", event["gateway_request_id"]
    )
    unnamed = await events(topics, "show", "--id", event["gateway_request_id"])
    assert unnamed.code == 2
    assert "pass --tenant" in unnamed.err
    hinted = await events(
        topics, "void", "--id", event["gateway_request_id"], "--tenant", tenant,
        "--event-occurred-at", utc_text(event["occurred_at"]), "--reason", "old",
    )  # fmt: skip
    assert hinted.code == 0, hinted


async def test_an_unreachable_broker_or_database_or_a_missing_topic_is_one_line(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = await store_event(pool, tenant)
    void = ["void", "--id", event["gateway_request_id"], "--reason", "x", "--correction-id", "c"]
    for environment, words in [
        ({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}, "cannot reach Kafka"),
        ({"DATABASE_URL": "postgresql://nobody@127.0.0.1:9/nowhere"}, "cannot reach PostgreSQL"),
        ({"USAGE_TOPIC": unique("no-such-topic")}, "does not exist"),
    ]:
        _one_line_and_exit_2(await events(topics, *void, **environment), words)
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.usage) == 0
