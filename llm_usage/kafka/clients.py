"""Creating and starting aiokafka clients, with one clear line when Kafka is not there."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

from llm_usage.core.errors import ConfigurationError, MissingTopicError, ServiceUnreachableError
from llm_usage.core.settings import Settings

T = TypeVar("T")


def client_options(settings: Settings) -> dict[str, Any]:
    """Connection options shared by every aiokafka client we create (bootstrap, security).

    SASL credentials are checked here, where a Kafka client is built, not when the settings
    are read: a worker that never opens a Kafka client (the rollup schedule) needs none."""
    _require_sasl_credentials(settings)
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism is not None:
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value()
            if settings.kafka_sasl_password
            else None
        )
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        try:
            options["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile)
        except (OSError, ValueError) as error:
            raise ConfigurationError(
                f"KAFKA_SSL_CAFILE={settings.kafka_ssl_cafile!r} cannot be used ({error}); "
                "point it at a readable PEM file of the broker's CA"
            ) from None
    return options


def _require_sasl_credentials(settings: Settings) -> None:
    """A SASL_* protocol needs a mechanism, and a mechanism a user name and a password."""
    if (
        settings.kafka_security_protocol.startswith("SASL_")
        and settings.kafka_sasl_mechanism is None
    ):
        raise ConfigurationError(
            f"KAFKA_SASL_MECHANISM is required with KAFKA_SECURITY_PROTOCOL="
            f"{settings.kafka_security_protocol}; set it (e.g. SCRAM-SHA-512)"
        )
    password = (
        settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""
    )
    if settings.kafka_sasl_mechanism is not None and not (
        settings.kafka_sasl_username and password
    ):
        raise ConfigurationError(
            f"KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD are required with "
            f"KAFKA_SASL_MECHANISM={settings.kafka_sasl_mechanism}; set both"
        )


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
        **membership_options(settings),
        **client_options(settings),
    )


def membership_options(settings: Settings) -> dict[str, Any]:
    """Static membership (KIP-345) when KAFKA_GROUP_INSTANCE_ID is set, and the session.

    A static member never sends LeaveGroup (aiokafka skips it on close), so a restart with the
    same id inside the session gets the same partitions back with no rebalance; a replica that
    is gone for good keeps its partitions still until the session expires.
    """
    session = settings.session_timeout_ms()
    heartbeat = settings.kafka_heartbeat_interval_ms
    if heartbeat * 3 > session:
        raise ConfigurationError(
            f"KAFKA_HEARTBEAT_INTERVAL_MS={heartbeat} must be at most a third of the session "
            f"({session} ms, KAFKA_SESSION_TIMEOUT_MS): a member would miss its session"
        )
    return {
        "group_instance_id": settings.kafka_group_instance_id or None,
        "session_timeout_ms": session,
        "heartbeat_interval_ms": heartbeat,
    }


def new_reader(settings: Settings) -> AIOKafkaConsumer:
    """A consumer outside any group, for reading partitions it assigns itself.

    An offset that retention deleted meanwhile reads on from the first offset kept (aiokafka's
    default would jump to the end and skip everything there is to read).
    """
    return _client(
        AIOKafkaConsumer,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **client_options(settings),
    )


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
    return _client(AIOKafkaProducer, **client_options(settings), **options)


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
        refused = await _security_refusal(settings)
        if refused is not None:
            raise ConfigurationError(refused) from None
        raise ServiceUnreachableError(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers} ({error}); "
            "start it (`llm-usage dev up`) or set KAFKA_BOOTSTRAP_SERVERS"
        ) from None


async def _security_refusal(settings: Settings) -> str | None:
    """If a broker answers but refuses our TLS or SASL settings, the line that says what to fix.

    aiokafka turns every failed bootstrap into "Unable to bootstrap" and only logs the cause, so
    after a failed start one connection per bootstrap server is tried again, alone, to learn it.
    """
    if settings.kafka_security_protocol == "PLAINTEXT":
        return None
    options = client_options(settings)
    for address in (part.strip() for part in settings.kafka_bootstrap_servers.split(",")):
        error = await _connect_once(address, options)
        line = None if error is None else _refusal_line(error, address, settings)
        if line is not None:
            return line
    return None


async def _connect_once(address: str, options: dict[str, Any]) -> BaseException | None:
    """Why one connection (with its TLS handshake and SASL login) to `address` fails, if it does."""
    host, _, port = address.rpartition(":")
    try:
        connection = await create_conn(
            host,
            int(port),
            request_timeout_ms=10_000,
            security_protocol=options["security_protocol"],
            ssl_context=options.get("ssl_context"),
            sasl_mechanism=options.get("sasl_mechanism"),
            sasl_plain_username=options.get("sasl_plain_username"),
            sasl_plain_password=options.get("sasl_plain_password"),
        )
    except (TimeoutError, KafkaError, OSError, ValueError) as error:
        return error
    connection.close()
    return None


def _refusal_line(error: BaseException, address: str, settings: Settings) -> str | None:
    """The line for a broker at `address` that answered and refused us; None if it did not."""
    if isinstance(error, SaslAuthenticationFailed):
        return (
            f"Kafka at {address} refused the login of KAFKA_SASL_USERNAME="
            f"{settings.kafka_sasl_username!r}: authentication failed ({error}); "
            "fix KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD (or KAFKA_SASL_MECHANISM)"
        )
    if isinstance(error, UnsupportedSaslMechanismError):
        return (
            f"Kafka at {address} does not enable KAFKA_SASL_MECHANISM="
            f"{settings.kafka_sasl_mechanism} on that listener; set the mechanism the "
            "broker's sasl.enabled.mechanisms names"
        )
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"Kafka at {address} presented a certificate that is not trusted "
            f"({error.verify_message}); point KAFKA_SSL_CAFILE at the PEM file of the CA "
            "that signed the broker's certificate"
        )
    if isinstance(error, ssl.SSLError):
        return (
            f"the TLS handshake with Kafka at {address} failed ({error}); check "
            "that KAFKA_SECURITY_PROTOCOL matches the broker's listener on that port"
        )
    if isinstance(error, ConnectionResetError):
        # Something listens there, but dropped us mid-handshake: a PLAINTEXT listener does
        # that to a TLS client (it reads the TLS hello as a request of absurd size).
        return (
            f"Kafka at {address} accepted the connection but closed it during the "
            f"handshake; check that KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol}"
            " matches the broker's listener on that port"
        )
    return None  # not there at all, or not answering: "cannot reach Kafka" says it


async def require_topics(consumer: AIOKafkaConsumer, topics: Iterable[str]) -> None:
    """Fail at once for a topic that does not exist, instead of waiting for it forever."""
    existing = await consumer.topics()
    missing = sorted(set(topics) - set(existing))
    if missing:
        raise MissingTopicError(
            f"topic {', '.join(missing)} does not exist on the broker; "
            "create it with `llm-usage topics ensure` (or fix USAGE_TOPIC / DLQ_TOPIC)"
        )
