"""Creating the pipeline's topics explicitly (`llm-usage topics ensure`), never by auto-create."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError

from llm_usage.core.errors import ServiceUnreachableError
from llm_usage.core.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TopicState:
    name: str
    partitions: int
    created: bool


def pipeline_topics(settings: Settings) -> list[str]:
    return [settings.usage_topic, settings.dlq_topic, settings.alerts_topic]


async def ensure_topics(
    settings: Settings,
    topics: list[str],
    *,
    partitions: int,
    replication_factor: int | None = None,
) -> list[TopicState]:
    """Create missing topics with `partitions` partitions; grow (never shrink) existing ones.

    The replication factor defaults to min(3, number of brokers).
    """
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    try:
        await admin.start()
    except (KafkaConnectionError, KafkaError, OSError) as error:
        await admin.close()
        raise ServiceUnreachableError(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers} ({error}); "
            "start it (`llm-usage dev up`) or set KAFKA_BOOTSTRAP_SERVERS"
        ) from None
    try:
        if replication_factor is None:
            cluster = await admin.describe_cluster()
            replication_factor = min(3, len(cluster["brokers"]))
        existing = await _partition_counts(admin, topics)
        missing = [name for name in topics if name not in existing]
        if missing:
            await admin.create_topics(
                [NewTopic(name, partitions, replication_factor) for name in missing]
            )
        grow = {
            name: NewPartitions(partitions)
            for name, count in existing.items()
            if count < partitions
        }
        if grow:
            await admin.create_partitions(grow)
        states = [
            TopicState(name, max(partitions, existing.get(name, 0)), name in missing)
            for name in topics
        ]
    finally:
        await admin.close()
    for state in states:
        log.info(
            "Topic ready.", topic=state.name, partitions=state.partitions, created=state.created
        )
    return states


async def _partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    present = set(await admin.list_topics()) & set(topics)
    if not present:
        return {}
    described = await admin.describe_topics(sorted(present))
    return {entry["topic"]: len(entry["partitions"]) for entry in described}
