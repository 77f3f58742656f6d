"""Settings for commands that run on their own (demo, bench): local services unless configured."""

from __future__ import annotations

import os

from llm_usage.core.settings import Settings, load_settings
from llm_usage.kafka.topics import ensure_topics, pipeline_topics
from llm_usage.local.dev import dev_up
from llm_usage.storage.migrate import migrate
from llm_usage.storage.pool import create_pool


def settings_for_local_run() -> Settings:
    """Use KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL when both are set; else `dev up` and use it."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("DATABASE_URL"):
        return load_settings()
    print("Starting local Kafka and PostgreSQL (a first run also fetches Kafka's jars)...")
    environment = dev_up()
    return load_settings(
        kafka_bootstrap_servers=environment.kafka_bootstrap_servers,
        database_url=environment.database_url,
    )


async def prepare(settings: Settings, *, partitions: int = 6) -> None:
    """Migrate the database and make sure the pipeline's topics exist."""
    pool = await create_pool(settings.database_url, size=1)
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
    finally:
        await pool.close()
    await ensure_topics(settings, pipeline_topics(settings), partitions=partitions)
