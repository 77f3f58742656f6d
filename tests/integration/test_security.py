"""The consumers over Kafka SASL_SSL (SCRAM-SHA-512) and PostgreSQL `sslmode=verify-full`,
against servers these tests configure for it, and no secret in anything a worker prints.

The CA and the server certificates are made here with openssl. The broker is a local Kafka
with a SASL_SSL listener beside its PLAINTEXT one; its SCRAM user is created by Kafka's own
StorageTool (`format --add-scram`). PostgreSQL is the system's (embedded PostgreSQL is built
without OpenSSL; see tests/integration/tls.py), accepting TLS with a password only.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from llm_usage.core.errors import LocalServiceError
from llm_usage.core.settings import Settings
from llm_usage.kafka.clients import client_options
from llm_usage.local.kafka import (
    KafkaCluster,
    SaslSslListener,
    ensure_kafka_jars,
    free_port_block,
)
from llm_usage.local.paths import state_dir
from llm_usage.storage.migrate import migrate
from tests.integration.pipeline import PipelineTopics, create_pipeline_topics, encode, usage_event
from tests.integration.tls import (
    CertificateAuthority,
    ServerCertificate,
    TlsPostgres,
    issue_server_certificate,
    new_certificate_authority,
    pkcs12_keystore,
    postgres_with_tls,
)
from tests.unavailable import service_unavailable

SCRAM_USER = "llm-usage-worker"
TLS_DATABASE = "llm_usage"


@dataclass(frozen=True)
class Certificates:
    ca: CertificateAuthority
    # A CA nobody's certificate is signed by: trusting it instead is the "wrong CA".
    other_ca: CertificateAuthority
    broker_keystore: Path
    keystore_password: str
    # For `localhost` only: PostgreSQL's URL must name it for verify-full to pass.
    postgres: ServerCertificate


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    # Readable by the server's own user (PostgreSQL copies its files; the consumer reads the CA).
    directory.chmod(0o755)
    try:
        ca = new_certificate_authority(directory, "ca")
        other_ca = new_certificate_authority(directory, "other-ca")
        broker = issue_server_certificate(
            ca, directory, "broker", dns_names=("localhost",), ip_addresses=("127.0.0.1",)
        )
        password = secrets.token_hex(12)
        keystore = pkcs12_keystore(broker, ca, directory / "broker.p12", password=password)
        postgres = issue_server_certificate(ca, directory, "postgres", dns_names=("localhost",))
    except LocalServiceError as error:
        service_unavailable(f"cannot make test certificates: {error}")
    return Certificates(ca, other_ca, keystore, password, postgres)


@dataclass(frozen=True)
class SecureKafka:
    """A one-node broker with a SASL_SSL listener and one SCRAM-SHA-512 user."""

    cluster: KafkaCluster
    password: str
    cafile: Path

    @property
    def bootstrap_servers(self) -> str:
        return self.cluster.sasl_ssl_bootstrap_servers

    def settings(self) -> dict[str, Any]:
        """Settings fields for a client that logs in over SASL_SSL."""
        return {
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": "SCRAM-SHA-512",
            "kafka_sasl_username": SCRAM_USER,
            "kafka_sasl_password": self.password,
            "kafka_ssl_cafile": str(self.cafile),
        }

    def environment(self) -> dict[str, str]:
        """The same, as a worker reads it from its environment."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": SCRAM_USER,
            "KAFKA_SASL_PASSWORD": self.password,
            "KAFKA_SSL_CAFILE": str(self.cafile),
        }


@pytest.fixture(scope="module")
def secure_kafka(
    certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureKafka]:
    password = f"kafka-secret-{secrets.token_hex(10)}"
    try:
        libs = ensure_kafka_jars()
    except LocalServiceError as error:
        service_unavailable(f"cannot run a local Kafka broker: {error}")
    cluster = KafkaCluster(
        state_dir=tmp_path_factory.mktemp("secure-kafka"),
        port=free_port_block(3),
        libs=libs,
        sasl_ssl=SaslSslListener(
            keystore=certificates.broker_keystore,
            keystore_password=certificates.keystore_password,
            scram_users={SCRAM_USER: password},
        ),
    )
    try:
        cluster.start()
    except LocalServiceError as error:
        cluster.stop()
        service_unavailable(f"no Kafka broker with a SASL_SSL listener: {error}")
    try:
        yield SecureKafka(cluster, password, certificates.ca.cert)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def tls_postgres(certificates: Certificates) -> Iterator[TlsPostgres]:
    """PostgreSQL on 127.0.0.1 taking only TLS with a password; TLS_DATABASE is migrated."""
    bin_dir = postgres_with_tls()
    if bin_dir is None:
        service_unavailable(
            "no PostgreSQL built with OpenSSL under /usr/lib/postgresql (embedded PostgreSQL "
            "has no TLS): install Debian's `postgresql` package"
        )
    # Not under pytest's tmp dirs (0700): as root the server runs as the `postgres` user.
    home = Path(tempfile.mkdtemp(prefix="pytest-tls-postgres-", dir=state_dir()))
    home.chmod(0o755)
    server = TlsPostgres(
        bin_dir=bin_dir,
        home=home,
        port=free_port_block(1),
        password=f"db-secret-{secrets.token_hex(10)}",
    )
    try:
        server.start(certificates.postgres)
        asyncio.run(_create_and_migrate(server))
    except LocalServiceError as error:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
        service_unavailable(f"no PostgreSQL with TLS: {error}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


async def _create_and_migrate(server: TlsPostgres) -> None:
    admin = await asyncpg.connect(server.admin_dsn(), timeout=10)
    try:
        await admin.execute(f"CREATE DATABASE {TLS_DATABASE}")
    finally:
        await admin.close()
    connection = await asyncpg.connect(server.admin_dsn(TLS_DATABASE), timeout=10)
    try:
        await migrate(connection)
    finally:
        await connection.close()


def verify_full_url(
    server: TlsPostgres, ca: CertificateAuthority, *, host: str = "localhost", password: str = ""
) -> str:
    """DATABASE_URL over TCP with `sslmode=verify-full`, trusting `ca`."""
    dsn = server.dsn(TLS_DATABASE, host=host, password=password or server.password)
    return f"{dsn}&sslrootcert={quote(str(ca.cert))}"


# --- Running a worker and reading what it printed ---------------------------------------------


@dataclass(frozen=True)
class Finished:
    """A `llm-usage consume usage` process that has exited, and everything it printed."""

    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def the_one_line(self) -> str:
        """The single line a failed start printed for a person, besides its JSON log entries."""
        assert self.code == 2, f"exit code {self.code}:\n{self.stderr[-3000:]}"
        assert "Traceback" not in self.output, self.output[-3000:]
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        plain = [line for line in lines if not line.startswith("{")]
        for entry in set(lines) - set(plain):
            json.loads(entry)  # every other line is a structured log entry
        assert len(plain) == 1, "\n".join(plain)
        assert plain[0].startswith("llm-usage: error: "), plain[0]
        return plain[0]


async def run_usage_consumer(env: dict[str, str], *arguments: str, within: float = 120) -> Finished:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_usage",
        "consume",
        "usage",
        *arguments,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), within)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(errors="replace"), stderr.decode())


async def secure_topics(secure_kafka: SecureKafka, database_url: str) -> PipelineTopics:
    """This test's own topics, created over the SASL_SSL listener."""
    return await create_pipeline_topics(
        bootstrap_servers=secure_kafka.bootstrap_servers,
        database_url=database_url,
        partitions=2,
        **secure_kafka.settings(),
    )


async def produce_securely(settings: Settings, topic: str, events: list[dict[str, Any]]) -> None:
    """Publish `events` over the listener and with the login `settings` name."""
    producer = AIOKafkaProducer(**client_options(settings), enable_idempotence=True)
    await producer.start()
    try:
        sent = [
            await producer.send(topic, key=e["tenant_id"].encode(), value=encode(e)) for e in events
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def worker_environment(
    topics: PipelineTopics, secure_kafka: SecureKafka, **overrides: str
) -> dict[str, str]:
    return {**topics.environment(), **secure_kafka.environment(), **overrides}


async def stored_ids(database_url: str, tenant: str) -> set[str]:
    connection = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await connection.fetch(
            "SELECT gateway_request_id FROM llm_usage_events WHERE tenant_id = $1", tenant
        )
    finally:
        await connection.close()
    return {row["gateway_request_id"] for row in rows}


# --- Kafka over SASL_SSL with SCRAM-SHA-512 ----------------------------------------------------


async def test_the_consumer_reads_over_sasl_ssl_with_scram_sha_512_and_stores_every_event(
    secure_kafka: SecureKafka, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await secure_topics(secure_kafka, database_url)
    tenant = f"tenant-{secrets.token_hex(5)}"
    events = [usage_event(tenant) for _ in range(12)]
    await produce_securely(topics.settings, topics.usage, events)

    finished = await run_usage_consumer(
        worker_environment(topics, secure_kafka), "--exit-when-idle", "1.5"
    )

    assert finished.code == 0, finished.stderr[-3000:]
    assert await stored_ids(database_url, tenant) == {e["gateway_request_id"] for e in events}
    assert secure_kafka.password not in finished.output


WRONG_KAFKA_SETTINGS = {
    "wrong password": (
        {"KAFKA_SASL_PASSWORD": "not-the-password-0451"},
        ["authentication failed", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", SCRAM_USER],
    ),
    "unknown user": (
        {"KAFKA_SASL_USERNAME": "nobody-here"},
        ["authentication failed", "KAFKA_SASL_USERNAME", "'nobody-here'"],
    ),
    "mechanism the broker does not enable": (
        {"KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"},
        ["does not enable KAFKA_SASL_MECHANISM=SCRAM-SHA-256"],
    ),
    "wrong CA": (
        {"KAFKA_SSL_CAFILE": "OTHER_CA"},
        ["certificate", "not trusted", "KAFKA_SSL_CAFILE"],
    ),
    "TLS to the PLAINTEXT listener": (
        {"KAFKA_BOOTSTRAP_SERVERS": "PLAINTEXT_LISTENER"},
        ["closed it during the handshake", "KAFKA_SECURITY_PROTOCOL=SASL_SSL"],
    ),
}


@pytest.mark.parametrize("case", WRONG_KAFKA_SETTINGS.values(), ids=list(WRONG_KAFKA_SETTINGS))
async def test_wrong_kafka_security_settings_stop_the_consumer_with_one_line_naming_the_fix(
    secure_kafka: SecureKafka,
    certificates: Certificates,
    database_url: str,
    pool: asyncpg.Pool,  # the session database is migrated: the worker gets as far as Kafka
    case: tuple[dict[str, str], list[str]],
) -> None:
    overrides, says = case
    topics = await secure_topics(secure_kafka, database_url)
    placeholders = {
        "OTHER_CA": str(certificates.other_ca.cert),
        "PLAINTEXT_LISTENER": secure_kafka.cluster.bootstrap_servers,
    }
    wrong = {name: placeholders.get(value, value) for name, value in overrides.items()}

    finished = await run_usage_consumer(worker_environment(topics, secure_kafka, **wrong))

    line = finished.the_one_line()
    for words in says:
        assert words in line, line
    assert "cannot reach Kafka" not in line  # it answered: the settings are what is wrong
    assert secure_kafka.password not in finished.output
    assert "not-the-password-0451" not in finished.output


# --- PostgreSQL with sslmode=verify-full ---------------------------------------------------------


async def test_the_consumer_stores_events_in_postgresql_over_verify_full_tls(
    secure_kafka: SecureKafka, tls_postgres: TlsPostgres, certificates: Certificates
) -> None:
    # The server's pg_hba.conf lets in TCP clients over TLS only, with a SCRAM password; the URL's
    # verify-full checks its certificate against the CA and the name `localhost`.
    database_url = verify_full_url(tls_postgres, certificates.ca)
    topics = await secure_topics(secure_kafka, database_url)
    tenant = f"tenant-{secrets.token_hex(5)}"
    events = [usage_event(tenant) for _ in range(7)]
    await produce_securely(topics.settings, topics.usage, events)

    finished = await run_usage_consumer(
        worker_environment(topics, secure_kafka), "--exit-when-idle", "1.5"
    )

    assert finished.code == 0, finished.stderr[-3000:]
    stored = await stored_ids(tls_postgres.admin_dsn(TLS_DATABASE), tenant)
    assert stored == {e["gateway_request_id"] for e in events}
    assert tls_postgres.password not in finished.output


WRONG_DATABASE_SETTINGS = {
    "wrong password": (
        {"password": "not-the-db-password-0451"},
        ["password authentication failed", "DATABASE_URL"],
    ),
    "wrong CA": ({"ca": "other"}, ["certificate verify failed", "DATABASE_URL"]),
    "name not in the certificate": (
        {"host": "127.0.0.1"},
        ["certificate is not valid for '127.0.0.1'", "DATABASE_URL"],
    ),
    "no TLS": ({"sslmode": "disable"}, ["no encryption", "DATABASE_URL"]),
}


@pytest.mark.parametrize(
    ("wrong", "says"), WRONG_DATABASE_SETTINGS.values(), ids=list(WRONG_DATABASE_SETTINGS)
)
async def test_wrong_database_tls_settings_stop_the_consumer_with_one_line(
    secure_kafka: SecureKafka,
    tls_postgres: TlsPostgres,
    certificates: Certificates,
    wrong: dict[str, str],
    says: list[str],
) -> None:
    topics = await secure_topics(secure_kafka, verify_full_url(tls_postgres, certificates.ca))
    ca = certificates.other_ca if wrong.get("ca") == "other" else certificates.ca
    database_url = verify_full_url(
        tls_postgres, ca, host=wrong.get("host", "localhost"), password=wrong.get("password", "")
    )
    if "sslmode" in wrong:
        database_url = database_url.replace("sslmode=verify-full", f"sslmode={wrong['sslmode']}")

    finished = await run_usage_consumer(
        worker_environment(topics, secure_kafka, DATABASE_URL=database_url)
    )

    line = finished.the_one_line()
    for words in says:
        assert words in line, line
    assert tls_postgres.password not in finished.output
    assert "not-the-db-password-0451" not in finished.output


async def test_a_verify_full_url_without_a_root_certificate_stops_with_one_line(
    secure_kafka: SecureKafka, tls_postgres: TlsPostgres, certificates: Certificates
) -> None:
    topics = await secure_topics(secure_kafka, verify_full_url(tls_postgres, certificates.ca))
    env = worker_environment(
        topics,
        secure_kafka,
        DATABASE_URL=tls_postgres.dsn(TLS_DATABASE),  # no sslrootcert, no ~/.postgresql/root.crt
        HOME=str(tls_postgres.home),
    )
    finished = await run_usage_consumer(env)
    assert "root.crt" in finished.the_one_line()


# --- No secret in anything a worker prints -------------------------------------------------------


async def test_no_password_appears_in_anything_a_worker_prints(
    secure_kafka: SecureKafka, tls_postgres: TlsPostgres, certificates: Certificates
) -> None:
    database_url = verify_full_url(tls_postgres, certificates.ca)
    topics = await secure_topics(secure_kafka, database_url)
    tenant = f"tenant-{secrets.token_hex(5)}"
    await produce_securely(topics.settings, topics.usage, [usage_event(tenant) for _ in range(3)])
    # Everything the workers may print, at the most talkative level.
    env = worker_environment(topics, secure_kafka, LOG_LEVEL="DEBUG", LOG_FORMAT="json")
    wrong_kafka = "wrong-kafka-secret-0451"
    wrong_db = "wrong-db-secret-0451"
    closed_port = free_port_block(1)
    unreachable = verify_full_url(tls_postgres, certificates.ca).replace(
        f":{tls_postgres.port}/", f":{closed_port}/"
    )

    runs = await asyncio.gather(
        run_usage_consumer(env, "--exit-when-idle", "1.5"),
        run_usage_consumer({**env, "KAFKA_SASL_PASSWORD": wrong_kafka}),
        run_usage_consumer(
            {
                **env,
                "DATABASE_URL": verify_full_url(tls_postgres, certificates.ca, password=wrong_db),
            }
        ),
        run_usage_consumer({**env, "DATABASE_URL": unreachable}),
    )

    good, kafka_refused, database_refused, database_unreachable = runs
    assert good.code == 0, good.stderr[-3000:]
    assert len(await stored_ids(tls_postgres.admin_dsn(TLS_DATABASE), tenant)) == 3
    assert "authentication failed" in kafka_refused.the_one_line()
    assert "password authentication failed" in database_refused.the_one_line()
    assert "cannot reach PostgreSQL" in database_unreachable.the_one_line()
    for run in runs:
        for secret in (secure_kafka.password, tls_postgres.password, wrong_kafka, wrong_db):
            assert secret not in run.output, f"{secret!r} was printed:\n{run.output[-3000:]}"


async def test_a_password_given_as_a_url_parameter_is_not_printed_either(
    secure_kafka: SecureKafka, database_url: str
) -> None:
    topics = await secure_topics(secure_kafka, database_url)
    secret = f"query-secret-{secrets.token_hex(6)}"
    unreachable = f"postgresql://worker@127.0.0.1:{free_port_block(1)}/db?password={secret}"
    finished = await run_usage_consumer(
        worker_environment(topics, secure_kafka, DATABASE_URL=unreachable)
    )
    assert "cannot reach PostgreSQL" in finished.the_one_line()
    assert secret not in finished.output
