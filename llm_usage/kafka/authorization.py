"""The start-up check: ask the broker which of a worker's ACLs (llm_usage/kafka/permissions.py)
its login is granted, and name a missing one in one line at start, never on the first dead letter
weeks later. Only metadata is asked: nothing is read, written or joined.

aiokafka 0.14 cannot ask for authorized operations (its Metadata stops at v5, and it reads
DescribeGroups v3 with the v2 answer), so the two requests are declared here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    for_code,
)
from aiokafka.protocol.admin import DescribeGroupsResponse_v3
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Int16, Int32, Schema, String

from llm_usage.core.errors import ConfigurationError, ServiceUnreachableError
from llm_usage.core.settings import Settings
from llm_usage.kafka.clients import client_options
from llm_usage.kafka.permissions import SEE, USERS, Acl, Resource, Worker, required_acls

# What a broker answers in `authorized_operations` when it was not asked (or does not say).
_NOT_REQUESTED = -(2**31)
_EVERY_OPERATION = -1


class _MetadataResponseV8(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 8
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            Array(
                ("node_id", Int32),
                ("host", String("utf-8")),
                ("port", Int32),
                ("rack", String("utf-8")),
            ),
        ),
        ("cluster_id", String("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            Array(
                ("error_code", Int16),
                ("topic", String("utf-8")),
                ("is_internal", Boolean),
                (
                    "partitions",
                    Array(
                        ("error_code", Int16),
                        ("partition", Int32),
                        ("leader", Int32),
                        ("leader_epoch", Int32),
                        ("replicas", Array(Int32)),
                        ("isr", Array(Int32)),
                        ("offline_replicas", Array(Int32)),
                    ),
                ),
                ("topic_authorized_operations", Int32),
            ),
        ),
        ("cluster_authorized_operations", Int32),
    )


class _MetadataRequestV8(RequestStruct):  # type: ignore[misc]
    """Metadata v8 (KIP-430): aiokafka stops at v5, which cannot ask for authorized operations."""

    API_KEY = 3
    API_VERSION = 8
    RESPONSE_TYPE = _MetadataResponseV8
    SCHEMA = Schema(
        ("topics", Array(String("utf-8"))),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
    )


class _TopicOperationsRequest(Request[_MetadataRequestV8]):  # type: ignore[misc]
    API_KEY = 3
    _CLASSES: ClassVar[tuple[type[RequestStruct]]] = (_MetadataRequestV8,)

    def __init__(self, topics: list[str]) -> None:
        self._topics = topics

    def build(self, request_struct_class: type[_MetadataRequestV8]) -> _MetadataRequestV8:
        return request_struct_class(self._topics, False, False, True)


class _DescribeGroupsRequestV3(RequestStruct):  # type: ignore[misc]
    """DescribeGroups v3 (KIP-430) parsed with the response that has `authorized_operations`
    (aiokafka 0.14 pairs its v3 request with the v2 response, which drops the field)."""

    API_KEY = 15
    API_VERSION = 3
    RESPONSE_TYPE = DescribeGroupsResponse_v3
    SCHEMA = Schema(("groups", Array(String("utf-8"))), ("include_authorized_operations", Boolean))


class _GroupOperationsRequest(Request[_DescribeGroupsRequestV3]):  # type: ignore[misc]
    API_KEY = 15
    _CLASSES: ClassVar[tuple[type[RequestStruct]]] = (_DescribeGroupsRequestV3,)

    def __init__(self, group: str) -> None:
        self._group = group

    def build(
        self, request_struct_class: type[_DescribeGroupsRequestV3]
    ) -> _DescribeGroupsRequestV3:
        return request_struct_class([self._group], True)


class PermissionMissingError(ConfigurationError):
    """Kafka denies a worker an operation the table says it needs."""


@dataclass(frozen=True)
class Refusals:
    """What a check found: ACLs the broker denies, and topics that do not exist."""

    denied: tuple[Acl, ...]
    missing_topics: tuple[str, ...]


async def check_acls(settings: Settings, acls: Sequence[Acl], *, seconds: float = 30) -> Refusals:
    """Ask the broker which of `acls` the login of `settings` is granted (Metadata v8 and
    DescribeGroups v3 with authorized operations): nothing is read, written or joined."""
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10_000)
    try:
        async with asyncio.timeout(seconds):
            await admin.start()
            topics = sorted({acl.name for acl in acls if acl.resource is Resource.TOPIC})
            groups = sorted({acl.name for acl in acls if acl.resource is Resource.GROUP})
            granted: dict[tuple[Resource, str], int] = {}
            missing: list[str] = []
            if topics:
                for name, operations in (await _topic_operations(admin, topics)).items():
                    if operations is None:
                        missing.append(name)
                    else:
                        granted[(Resource.TOPIC, name)] = operations
            for group in groups:
                granted[(Resource.GROUP, group)] = await _group_operations(admin, group)
    finally:
        await admin.close()
    denied = tuple(
        acl
        for acl in acls
        if acl.name not in missing
        and not granted.get((acl.resource, acl.name), 0) & (1 << acl.operation_code)
    )
    return Refusals(denied=denied, missing_topics=tuple(missing))


async def _topic_operations(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int | None]:
    """Each topic's authorized-operations bits; 0 where Describe is denied, None where the topic
    does not exist (Kafka says so only to a principal that may describe it)."""
    response: Any = await admin._send_request(_TopicOperationsRequest(topics))
    found: dict[str, int | None] = {}
    for error_code, name, _, _, operations in response.topics:
        if error_code == TopicAuthorizationFailedError.errno:
            found[name] = 0
        elif error_code == UnknownTopicOrPartitionError.errno:
            found[name] = None
        else:  # another error (a leader being elected) leaves the authorization known
            found[name] = _reported(operations)
    return found


def _reported(operations: int) -> int:
    """The bits a broker reported; every bit where it did not say (a broker that does not
    compute them is not second-guessed: the worker finds out at its first request, as before)."""
    return _EVERY_OPERATION if operations == _NOT_REQUESTED else int(operations)


async def _group_operations(admin: AIOKafkaAdminClient, group: str) -> int:
    """The group's authorized-operations bits; 0 where even Describe is denied. A coordinator
    that is not there yet (a new cluster creates __consumer_offsets on first use) is waited for.
    """
    while True:
        try:
            return await _describe_group(admin, group)
        except KafkaError as error:
            if not error.retriable:
                raise
        await asyncio.sleep(0.2)


async def _describe_group(admin: AIOKafkaAdminClient, group: str) -> int:
    try:
        coordinator = await admin.find_coordinator(group)
    except GroupAuthorizationFailedError:
        return 0  # FindCoordinator needs Describe on the group
    response: Any = await admin._send_request(_GroupOperationsRequest(group), coordinator)
    for error_code, _name, _state, _, _, _members, operations in response.groups:
        if error_code == GroupAuthorizationFailedError.errno:
            return 0
        if error_code != 0:
            raise for_code(error_code)(f"DescribeGroups for group {group}")
        return _reported(operations)
    return 0


def refusal_line(settings: Settings, denied: Sequence[Acl], *, worker: Worker) -> str | None:
    """The one line for a person, or None if nothing is denied."""
    if not denied:
        return None
    user = settings.kafka_sasl_username or "ANONYMOUS"
    by_resource: dict[tuple[Resource, str], list[str]] = {}
    for acl in denied:
        by_resource.setdefault((acl.resource, acl.name), []).append(acl.operation.value)
    what = "; ".join(
        f"{' and '.join(ops)} on {resource} {name}" for (resource, name), ops in by_resource.items()
    )
    return (
        f"Kafka denies {what} to user {user}, which the {worker} worker needs: grant it "
        f"(as the KafkaUser {USERS[worker]} does; {SEE})"
    )


async def require_permissions(settings: Settings, worker: Worker, *, seconds: float = 30) -> None:
    """Stop at start, in one line, if Kafka denies `worker` anything the table gives it; never
    on the first dead letter weeks later. A topic that does not exist is not this check's
    business (`require_topics` says it for the topics a worker cannot start without)."""
    try:
        refusals = await check_acls(settings, required_acls(settings, worker), seconds=seconds)
    except ValueError as error:  # e.g. a port that is not a number
        raise ConfigurationError(
            f"KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers!r} is not usable "
            f"({error}); give host:port pairs separated by commas"
        ) from None
    except NotImplementedError:
        raise ConfigurationError(
            f"Kafka at {settings.kafka_bootstrap_servers} is older than 2.3 and cannot say which "
            "operations it grants (Metadata v8, KIP-430); run Kafka 2.3 or newer"
        ) from None
    except (TimeoutError, KafkaError, OSError) as error:
        raise ServiceUnreachableError(
            f"cannot ask Kafka at {settings.kafka_bootstrap_servers} which operations it grants "
            f"({type(error).__name__}: {error}); start it or set KAFKA_BOOTSTRAP_SERVERS"
        ) from None
    line = refusal_line(settings, refusals.denied, worker=worker)
    if line is not None:
        raise PermissionMissingError(line)
