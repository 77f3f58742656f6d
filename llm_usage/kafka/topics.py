"""Creating the pipeline's topics explicitly (`llm-usage topics ensure`), never by auto-create.

The broker answers a CreateTopics request with an error code per topic, not with an exception:
every code is read. A topic that another process created meanwhile (`TOPIC_ALREADY_EXISTS`, or a
partition count already raised) is success; any other refusal ends in one line naming the topic.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import (
    BrokerResponseError,
    ClusterAuthorizationFailedError,
    InvalidConfigurationError,
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaError,
    LeaderNotAvailableError,
    PolicyViolationError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    for_code,
)

from llm_usage.core.errors import ConfigurationError, ServiceUnreachableError
from llm_usage.core.settings import Settings
from llm_usage.kafka.clients import client_options

log = structlog.get_logger(__name__)

# Retriable per-topic codes (NOT_CONTROLLER, REQUEST_TIMED_OUT, ...) are sent again this often.
_ATTEMPTS = 4
_RETRY_SECONDS = 0.5
# How long a topic that another process just created may stay invisible to our metadata reads.
_VISIBLE_WITHIN_SECONDS = 10.0

_ADVICE: dict[int, str] = {
    InvalidReplicationFactorError.errno: (
        "pass --replication-factor no larger than the number of brokers ({brokers})"
    ),
    InvalidTopicError.errno: (
        "choose a valid name (ASCII letters, digits, '.', '_' and '-', at most 249 characters) "
        "in USAGE_TOPIC, DLQ_TOPIC or ALERTS_TOPIC"
    ),
    PolicyViolationError.errno: (
        "the cluster's topic policy refused it: ask the Kafka administrators to create it, "
        "or change --partitions / --replication-factor to what the policy allows"
    ),
    InvalidConfigurationError.errno: (
        "the broker rejected the topic's configuration: check the broker's topic defaults "
        "(e.g. min.insync.replicas against the replication factor)"
    ),
    InvalidPartitionsError.errno: "choose a --partitions value the broker accepts",
    TopicAuthorizationFailedError.errno: (
        "the Kafka user may not create or alter it: grant it CREATE and ALTER on the topic, "
        "or have an administrator run `llm-usage topics ensure`"
    ),
    ClusterAuthorizationFailedError.errno: (
        "the Kafka user may not create topics: grant it CREATE on the cluster, "
        "or have an administrator run `llm-usage topics ensure`"
    ),
}
_DEFAULT_ADVICE = "see the broker's log, fix the cause and run `llm-usage topics ensure` again"


@dataclass(frozen=True)
class TopicState:
    name: str
    partitions: int
    created: bool


@dataclass(frozen=True)
class TopicRefusal:
    """One topic's error code in a broker's answer, and the broker's own words about it."""

    topic: str
    code: int
    message: str | None

    @property
    def name(self) -> str:
        """The protocol's name of the code, e.g. `INVALID_REPLICATION_FACTOR`."""
        return str(for_code(self.code).message)

    @property
    def retriable(self) -> bool:
        return bool(for_code(self.code).retriable)


def pipeline_topics(settings: Settings) -> list[str]:
    return [settings.usage_topic, settings.dlq_topic, settings.alerts_topic]


def topic_errors(response: object) -> list[TopicRefusal]:
    """The per-topic errors of a CreateTopics (any version) or CreatePartitions response.

    Version 0 of CreateTopics carries (topic, code); later versions add the broker's message.
    """
    entries: list[tuple[Any, ...]] = list(getattr(response, "topic_errors", []))
    return [
        TopicRefusal(str(topic), int(code), None if not rest or rest[0] is None else str(rest[0]))
        for topic, code, *rest in entries
        if int(code) != 0
    ]


def refusal(action: str, error: TopicRefusal, *, brokers: int) -> ConfigurationError:
    """The one line for a topic the broker would not create or grow: which, why, what to do."""
    detail = f"{error.name}: {error.message}" if error.message else error.name
    advice = _ADVICE.get(error.code, _DEFAULT_ADVICE).format(brokers=brokers)
    return ConfigurationError(
        f"Kafka refused to {action} topic {error.topic!r} ({detail}); {advice}"
    )


async def ensure_topics(
    settings: Settings,
    topics: list[str],
    *,
    partitions: int,
    replication_factor: int | None = None,
) -> list[TopicState]:
    """Create missing topics with `partitions` partitions; grow (never shrink) existing ones.

    The replication factor defaults to min(3, number of brokers). Safe to run from several
    processes at once: what another one created or grew meanwhile counts as done.
    """
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()
    except (KafkaConnectionError, KafkaError, OSError) as error:
        await admin.close()
        raise ServiceUnreachableError(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers} ({error}); "
            "start it (`llm-usage dev up`) or set KAFKA_BOOTSTRAP_SERVERS"
        ) from None
    try:
        states = await _ensure(admin, topics, partitions, replication_factor)
    except (KafkaConnectionError, TimeoutError, OSError) as error:
        raise ServiceUnreachableError(
            f"Kafka at {settings.kafka_bootstrap_servers} stopped answering while topics were "
            f"ensured ({error!r}); check the broker and run `llm-usage topics ensure` again"
        ) from None
    except BrokerResponseError as error:
        raise ConfigurationError(
            f"Kafka refused a request while topics were ensured ({error}); {_DEFAULT_ADVICE}"
        ) from None
    except KafkaError as error:
        raise ServiceUnreachableError(
            f"Kafka at {settings.kafka_bootstrap_servers} failed while topics were ensured "
            f"({error!r}); check the broker and run `llm-usage topics ensure` again"
        ) from None
    finally:
        await admin.close()
    for state in states:
        log.info(
            "Topic ready.", topic=state.name, partitions=state.partitions, created=state.created
        )
    return states


async def _ensure(
    admin: AIOKafkaAdminClient,
    topics: list[str],
    partitions: int,
    replication_factor: int | None,
) -> list[TopicState]:
    brokers = len((await admin.describe_cluster())["brokers"])
    if replication_factor is None:
        replication_factor = min(3, brokers)
    counts = await _partition_counts(admin, topics)
    missing = [name for name in topics if name not in counts]
    created, raced = await _create(admin, missing, partitions, replication_factor, brokers)
    if raced:
        counts |= await _wait_until_visible(admin, raced)
    for name in created:
        counts[name] = partitions
    for name, count in list(counts.items()):
        if count < partitions:
            counts[name] = await _grow(admin, name, partitions, brokers)
    return [TopicState(name, counts[name], name in created) for name in topics]


async def _create(
    admin: AIOKafkaAdminClient,
    names: list[str],
    partitions: int,
    replication_factor: int,
    brokers: int,
) -> tuple[list[str], list[str]]:
    """Create `names`; return (created by us, created meanwhile by someone else)."""
    created: list[str] = []
    raced: list[str] = []
    pending = list(names)
    for attempt in range(1, _ATTEMPTS + 1):
        if not pending:
            break
        response = await admin.create_topics(
            [NewTopic(name, partitions, replication_factor) for name in pending]
        )
        failed = {error.topic: error for error in topic_errors(response)}
        created += [name for name in pending if name not in failed]
        pending = []
        for name, error in failed.items():
            if error.code == TopicAlreadyExistsError.errno:
                raced.append(name)
            elif error.retriable and attempt < _ATTEMPTS:
                pending.append(name)
            else:
                raise refusal("create", error, brokers=brokers)
        if pending:
            await asyncio.sleep(_RETRY_SECONDS * attempt)
    return created, raced


async def _grow(admin: AIOKafkaAdminClient, name: str, partitions: int, brokers: int) -> int:
    """Raise `name` to `partitions` partitions; return its count, at least `partitions`.

    aiokafka raises the first per-topic error of a CreatePartitions answer, so one topic is
    asked at a time and the exception names it.
    """
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            await admin.create_partitions({name: NewPartitions(partitions)})
        except InvalidPartitionsError as error:
            # Grown meanwhile by another process to this many or more: done. Metadata can lag
            # the controller's answer for a moment, so look a few times before refusing.
            for _ in range(_ATTEMPTS * 2):
                count = (await _partition_counts(admin, [name])).get(name, 0)
                if count >= partitions:
                    return count
                await asyncio.sleep(_RETRY_SECONDS)
            raise refusal("grow", _error_of(name, error), brokers=brokers) from None
        except BrokerResponseError as error:
            if not error.retriable or attempt == _ATTEMPTS:
                raise refusal("grow", _error_of(name, error), brokers=brokers) from None
            await asyncio.sleep(_RETRY_SECONDS * attempt)
        else:
            return partitions
    raise AssertionError("unreachable: the last attempt returns or raises")


def _error_of(topic: str, error: BrokerResponseError) -> TopicRefusal:
    # aiokafka words it "[Error 37] InvalidPartitionsError: Could not create partitions for t: …".
    text = str(error)
    detail = text.split(": ", 2)[-1] if text.count(": ") >= 2 else text
    return TopicRefusal(topic, int(error.errno or -1), detail)


async def _wait_until_visible(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    """Partition counts of topics another process just created, once metadata shows them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _VISIBLE_WITHIN_SECONDS
    while True:
        counts = await _partition_counts(admin, names)
        if set(names) <= counts.keys():
            return counts
        if loop.time() > deadline:
            unseen = sorted(set(names) - counts.keys())
            raise ServiceUnreachableError(
                f"Kafka says topic {unseen[0]!r} exists but does not describe it after "
                f"{_VISIBLE_WITHIN_SECONDS:.0f} s; check the broker and run "
                "`llm-usage topics ensure` again"
            )
        await asyncio.sleep(_RETRY_SECONDS)


async def _partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Partition counts of those of `topics` that exist (and are visible yet)."""
    present = set(await admin.list_topics()) & set(topics)
    if not present:
        return {}
    counts = {}
    for entry in await admin.describe_topics(sorted(present)):
        code = int(entry["error_code"])
        if code in (UnknownTopicOrPartitionError.errno, LeaderNotAvailableError.errno):
            continue  # deleted, or just created and not yet everywhere
        if code != 0:
            error = TopicRefusal(entry["topic"], code, None)
            raise ConfigurationError(
                f"Kafka would not describe topic {error.topic!r} ({error.name}); "
                f"{_ADVICE.get(code, _DEFAULT_ADVICE).format(brokers='?')}"
            )
        counts[entry["topic"]] = len(entry["partitions"])
    return counts
