"""The Kafka cluster CA rotation of docs/operations.md, as Strimzi does it, on a real broker.

When Strimzi replaces the cluster CA's key (`force-replace`, or `certificateExpirationPolicy:
replace-key` at the renewal), its `<cluster>-cluster-ca-cert` Secret holds the new `ca.crt` and
the old one as `ca-<date>.crt` while it rolls the brokers to certificates of the new CA. A
worker whose KAFKA_SSL_CAFILE is the bundle of both keeps working through the roll; one that
trusts only the old CA stops, at its next start, with one line. (A renewal that keeps the key is
the easy case: the renewed CA certificate verifies old and new broker certificates alike.)

The roll is one broker restart here: the broker goes down, comes back with a certificate of the
new CA at the same keystore path, and the running worker reconnects on its own.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from llm_usage.core.errors import LocalServiceError
from llm_usage.local.kafka import KafkaCluster, SaslSslListener, ensure_kafka_jars, free_port_block
from tests.integration.pipeline import (
    PipelineTopics,
    create_pipeline_topics,
    encode,
    produce,
    unique,
    usage_event,
    wait_until,
)
from tests.integration.tls import (
    CertificateAuthority,
    issue_server_certificate,
    new_certificate_authority,
    pkcs12_keystore,
)
from tests.unavailable import service_unavailable

USER = "llm-usage-ingest"


@dataclass(frozen=True)
class Rotation:
    cluster: KafkaCluster
    password: str
    old_ca: CertificateAuthority
    new_ca: CertificateAuthority
    bundle: Path  # old + new, as the synced Secret's ca.crt holds them during the roll
    keystore: Path  # where the broker reads its certificate (what Strimzi's roll replaces)
    keystore_password: str
    directory: Path

    def move_broker_to_the_new_ca(self) -> None:
        """Restart the broker with a certificate of the new CA (same names, same path)."""
        broker = issue_server_certificate(
            self.new_ca, self.directory, "broker-new", ip_addresses=("127.0.0.1",)
        )
        staged = pkcs12_keystore(
            broker, self.new_ca, self.directory / "staged.p12", password=self.keystore_password
        )
        self.cluster.kill_node(0)
        staged.replace(self.keystore)
        self.cluster.start_node(0)


@pytest.fixture(scope="module")
def rotation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rotation]:
    directory = tmp_path_factory.mktemp("ca-rotation")
    directory.chmod(0o755)
    try:
        old_ca = new_certificate_authority(directory, "old-ca")
        new_ca = new_certificate_authority(directory, "new-ca")
        broker = issue_server_certificate(
            old_ca, directory, "broker-old", ip_addresses=("127.0.0.1",)
        )
        keystore_password = secrets.token_hex(12)
        keystore = pkcs12_keystore(
            broker, old_ca, directory / "broker.p12", password=keystore_password
        )
        libs = ensure_kafka_jars()
    except LocalServiceError as error:
        service_unavailable(f"cannot set up the CA rotation: {error}")
    bundle = directory / "ca-bundle.crt"
    bundle.write_text(old_ca.cert.read_text() + new_ca.cert.read_text())
    password = f"pw-{secrets.token_hex(10)}"
    cluster = KafkaCluster(
        state_dir=tmp_path_factory.mktemp("ca-rotation-kafka"),
        port=free_port_block(3),
        libs=libs,
        sasl_ssl=SaslSslListener(
            keystore=keystore, keystore_password=keystore_password, scram_users={USER: password}
        ),
    )
    try:
        cluster.start()
    except LocalServiceError as error:
        cluster.stop()
        service_unavailable(f"no Kafka broker with a SASL_SSL listener: {error}")
    try:
        yield Rotation(
            cluster, password, old_ca, new_ca, bundle, keystore, keystore_password, directory
        )
    finally:
        cluster.stop()


def environment(topics: PipelineTopics, rotation: Rotation, cafile: Path) -> dict[str, str]:
    return {
        **topics.environment(),
        "KAFKA_BOOTSTRAP_SERVERS": rotation.cluster.sasl_ssl_bootstrap_servers,
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": USER,
        "KAFKA_SASL_PASSWORD": rotation.password,
        "KAFKA_SSL_CAFILE": str(cafile),
    }


async def stored_count(pool: asyncpg.Pool, tenant: str) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM llm_usage_events WHERE tenant_id = $1", tenant)
    )


async def test_a_worker_trusting_old_and_new_ca_keeps_working_when_the_broker_moves_to_the_new(
    rotation: Rotation, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=rotation.cluster.bootstrap_servers,  # PLAINTEXT: the test's own door
        database_url=database_url,
        partitions=2,
    )
    tenant = unique("tenant")
    admin_door = rotation.cluster.bootstrap_servers

    async def publish(count: int) -> None:
        events = [usage_event(tenant) for _ in range(count)]
        await produce(admin_door, topics.usage, [(tenant.encode(), encode(e)) for e in events])

    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_usage", "consume", "usage",
        env=environment(topics, rotation, rotation.bundle),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    lines: list[str] = []

    async def collect() -> None:
        assert worker.stderr is not None
        async for raw in worker.stderr:
            lines.append(raw.decode(errors="replace").rstrip("\n"))

    reader = asyncio.create_task(collect())
    try:
        await publish(5)

        async def stored(n: int) -> bool:
            assert worker.returncode is None, "\n".join(lines[-60:])
            return await stored_count(pool, tenant) == n

        await wait_until(lambda: stored(5), within=60, message="the first five were not stored")

        await asyncio.to_thread(rotation.move_broker_to_the_new_ca)
        await publish(5)

        await wait_until(
            lambda: stored(10), within=90, message="nothing stored after the broker's new CA"
        )
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 45) == 0, "\n".join(lines[-60:])
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        await reader
    assert not [line for line in lines if not line.startswith("{")], lines[-20:]

    # After the roll, a worker that still trusts only the old CA stops at start in one line;
    # one that trusts the new CA alone (the Secret once the old certificate is dropped) works.
    old_only = await _run_once(environment(topics, rotation, rotation.old_ca.cert))
    assert old_only[0] == 2, old_only[1][-2000:]
    plain = [line for line in old_only[1].splitlines() if line and not line.startswith("{")]
    assert len(plain) == 1, plain
    assert "not trusted" in plain[0]
    assert "KAFKA_SSL_CAFILE" in plain[0]
    await publish(2)
    new_only = await _run_once(
        environment(topics, rotation, rotation.new_ca.cert), "--exit-when-idle", "2"
    )
    assert new_only[0] == 0, new_only[1][-2000:]
    assert await stored_count(pool, tenant) == 12


async def _run_once(env: dict[str, str], *arguments: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_usage", "consume", "usage", *arguments,
        env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    text = stderr.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("{"):
            json.loads(line)
    return process.returncode, text
