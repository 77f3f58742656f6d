"""The gateway team's example in docs/ publishes an event the consumer stores."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import asyncpg

from llm_usage.consumers.usage.consumer import run_usage_consumer
from llm_usage.storage.migrate import migrate
from tests.integration.pipeline import create_pipeline_topics, stored_for

EXAMPLE = Path(__file__).parents[2] / "docs" / "examples" / "publish_usage_event.py"


async def test_publishing_example_runs_and_its_event_is_stored(
    kafka_bootstrap_servers: str, database_url: str
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        env={
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap_servers,
            "USAGE_TOPIC": topics.usage,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode()
    match = re.search(r"published (\S+) to partition", output.decode())
    assert match is not None, output.decode()

    connection = await asyncpg.connect(database_url)
    try:
        await migrate(connection)
    finally:
        await connection.close()
    await asyncio.wait_for(run_usage_consumer(topics.settings, exit_when_idle=1.5), 120)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    assert pool is not None
    try:
        [row] = await stored_for(pool, [match[1]])
    finally:
        await pool.close()
    assert row["tenant_id"] == "acme"
    assert str(row["customer_charge_usd"]) == "0.000432"
