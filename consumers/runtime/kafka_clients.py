"""Creating and starting aiokafka clients, with one clear line when Kafka is not there."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from llm_usage.core.errors import ConfigurationError, MissingTopicError, ServiceUnreachableError
from llm_usage.core.settings import Settings

T = TypeVar("T")


def new_consumer(settings: Settings, *, group_id: str, max_batch: int) -> AIOKafkaConsumer:
    """A group member that commits by hand and starts from the earliest retained event."""
    return _client(
        AIOKafkaConsumer,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # Records of a transaction the gateway aborted (or has not committed yet) are never usage.
        isolation_level="read_committed",
        max_poll_records=max_batch,
        # A big fetch keeps a replica busy between round trips; records stay bounded by max_batch.
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        # A rebalance waits this long for the batch in flight (see on_partitions_revoked).
        rebalance_timeout_ms=60_000,
        **settings.kafka_client_options(),
    )


def new_reader(settings: Settings) -> AIOKafkaConsumer:
    """A consumer outside any group, for reading partitions it assigns itself."""
    return _client(AIOKafkaConsumer, enable_auto_commit=False, **settings.kafka_client_options())


def new_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer (acks=all): a retried send never writes a record twice."""
    options: dict[str, Any] = {
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 5,
        # Dead letters carry values up to the broker's own limit, plus headers.
        "compression_type": "gzip",
        "max_request_size": 8 * 1024 * 1024,
    }
    options.update(overrides)
    return _client(AIOKafkaProducer, **settings.kafka_client_options(), **options)


def _client(kind: type[T], **options: Any) -> T:
    """Build a client; options aiokafka refuses (e.g. SASL without a password) are config errors."""
    try:
        return kind(**options)
    except (ValueError, TypeError) as error:
        raise ConfigurationError(
            f"Kafka client settings are not usable ({error}); "
            "check the KAFKA_SECURITY_PROTOCOL and KAFKA_SASL_* variables"
        ) from None


async def start_client(client: AIOKafkaConsumer | AIOKafkaProducer, settings: Settings) -> None:
    """Start `client`, turning "no broker answers" into a person-fixable error."""
    try:
        await client.start()
    except ValueError as error:  # e.g. a port that is not a number
        await client.stop()
        raise ConfigurationError(
            f"KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers!r} is not usable "
            f"({error}); give host:port pairs separated by commas"
        ) from None
    except (KafkaConnectionError, KafkaError, OSError) as error:
        await client.stop()
        raise ServiceUnreachableError(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers} ({error}); "
            "start it (`llm-usage dev up`) or set KAFKA_BOOTSTRAP_SERVERS"
        ) from None


async def require_topics(consumer: AIOKafkaConsumer, topics: Iterable[str]) -> None:
    """Fail at once for a topic that does not exist, instead of waiting for it forever."""
    existing = await consumer.topics()
    missing = sorted(set(topics) - set(existing))
    if missing:
        raise MissingTopicError(
            f"topic {', '.join(missing)} does not exist on the broker; "
            "create it with `llm-usage topics ensure` (or fix USAGE_TOPIC / DLQ_TOPIC)"
        )
