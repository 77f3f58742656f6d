"""The ACL table of llm_usage/kafka/permissions.py on a real broker that enforces it.

One local Kafka runs KRaft's StandardAuthorizer (as a Strimzi cluster with `authorization:
simple` does) with a SASL_SSL listener and one SCRAM-SHA-512 user per worker, named as the
KafkaUsers are. Each user gets exactly the ACLs of the table, created through the Admin API over
the PLAINTEXT listener (whose ANONYMOUS principal is the test's super user). Then:

- every worker runs as its own user and does its work end to end;
- for each ACL of each worker, with that one ACL removed, the start-up check names it, and the
  real worker processes stop at start with that one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import TopicAuthorizationFailedError
from aiokafka.protocol.admin import CreateAclsRequest, DeleteAclsRequest
from aiokafka.structs import ConsumerRecord, TopicPartition

from llm_usage.api.server import LISTENING
from llm_usage.core.errors import LocalServiceError
from llm_usage.core.settings import Settings
from llm_usage.kafka.authorization import (
    PermissionMissingError,
    Refusals,
    check_acls,
    require_permissions,
)
from llm_usage.kafka.clients import client_options, new_reader
from llm_usage.kafka.permissions import USERS, Acl, Operation, Resource, Worker, required_acls
from llm_usage.kafka.topics import ensure_topics
from llm_usage.local.kafka import KafkaCluster, SaslSslListener, ensure_kafka_jars, free_port_block
from tests.api_support import AUDIENCE, SECRET, bearer, token
from tests.integration.pipeline import (
    encode,
    produce,
    read_topic,
    stored_for,
    topic_record_count,
    unique,
    usage_event,
)
from tests.integration.tls import (
    issue_server_certificate,
    new_certificate_authority,
    pkcs12_keystore,
)
from tests.unavailable import service_unavailable

# Kafka's wire codes: pattern type LITERAL, permission ALLOW.
_LITERAL = 3
_ALLOW = 3
# Ignored by DeleteAcls filters, as ANY.
_ANY = 1


@dataclass(frozen=True)
class AclKafka:
    """A broker that enforces ACLs, a password per worker's user, and the CA its clients trust."""

    cluster: KafkaCluster
    passwords: dict[str, str]
    cafile: Path

    def login(self, worker: Worker) -> dict[str, Any]:
        """Settings fields for `worker`'s own user over SASL_SSL."""
        user = USERS[worker]
        return {
            "kafka_bootstrap_servers": self.cluster.sasl_ssl_bootstrap_servers,
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": "SCRAM-SHA-512",
            "kafka_sasl_username": user,
            "kafka_sasl_password": self.passwords[user],
            "kafka_ssl_cafile": str(self.cafile),
        }


@pytest.fixture(scope="module")
def acl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclKafka]:
    directory = tmp_path_factory.mktemp("acl-tls")
    directory.chmod(0o755)
    try:
        ca = new_certificate_authority(directory, "ca")
        broker = issue_server_certificate(ca, directory, "broker", ip_addresses=("127.0.0.1",))
        keystore_password = secrets.token_hex(12)
        keystore = pkcs12_keystore(broker, ca, directory / "broker.p12", password=keystore_password)
        libs = ensure_kafka_jars()
    except LocalServiceError as error:
        service_unavailable(f"no broker with ACLs: {error}")
    passwords = {user: f"pw-{secrets.token_hex(10)}" for user in USERS.values()}
    cluster = KafkaCluster(
        state_dir=tmp_path_factory.mktemp("acl-kafka"),
        port=free_port_block(3),
        libs=libs,
        sasl_ssl=SaslSslListener(
            keystore=keystore,
            keystore_password=keystore_password,
            scram_users=passwords,
            authorizer=True,
        ),
    )
    try:
        cluster.start()
    except LocalServiceError as error:
        cluster.stop()
        service_unavailable(f"no Kafka broker with the StandardAuthorizer: {error}")
    try:
        yield AclKafka(cluster, passwords, ca.cert)
    finally:
        cluster.stop()


# --- ACLs through the Admin API --------------------------------------------------------------


async def _admin(kafka: AclKafka) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.cluster.bootstrap_servers)
    await admin.start()
    return admin


async def grant(kafka: AclKafka, user: str, acls: Sequence[Acl]) -> None:
    admin = await _admin(kafka)
    try:
        for acl in acls:
            request = CreateAclsRequest(
                acl.resource_code, acl.name, _LITERAL, f"User:{user}", "*",
                acl.operation_code, _ALLOW,
            )  # fmt: skip
            response: Any = await admin._send_request(request)
            for error_code, message in response.creation_responses:
                assert error_code == 0, message
    finally:
        await admin.close()


async def revoke(kafka: AclKafka, user: str, acl: Acl) -> None:
    admin = await _admin(kafka)
    try:
        request = DeleteAclsRequest(
            acl.resource_code, acl.name, _LITERAL, f"User:{user}", "*", acl.operation_code, _ALLOW
        )
        response: Any = await admin._send_request(request)
        (error_code, message, matching) = response.filter_responses[0]
        assert error_code == 0, message
        assert len(matching) == 1, matching
    finally:
        await admin.close()


async def wait_for_refusals(
    settings: Settings, acls: Sequence[Acl], denied: Sequence[Acl], *, within: float = 15
) -> None:
    """Until the broker's authorizer (fed by the metadata log) denies exactly `denied`."""
    deadline = time.monotonic() + within
    while True:
        found = (await check_acls(settings, acls)).denied
        if set(found) == set(denied):
            return
        assert time.monotonic() < deadline, f"denied {found}, expected {denied}"
        await asyncio.sleep(0.1)


@dataclass(frozen=True)
class Names:
    """This module's topics and groups (one set: the ACLs name them), as Settings fields."""

    fields: dict[str, Any]

    def settings(self, kafka: AclKafka, worker: Worker, **more: Any) -> Settings:
        return Settings(**self.fields, **kafka.login(worker), **more)


@pytest.fixture(scope="module")
def names(acl_kafka: AclKafka) -> Names:
    base = unique("acl")
    fields: dict[str, Any] = {
        "usage_topic": f"{base}.usage",
        "dlq_topic": f"{base}.usage.dlq",
        "alerts_topic": f"{base}.alerts",
        "usage_group_id": f"{base}.ingest",
        "budget_group_id": f"{base}.budget",
    }
    asyncio.run(_create_and_grant(acl_kafka, fields))
    return Names(fields)


async def _create_and_grant(kafka: AclKafka, fields: dict[str, Any]) -> None:
    admin_settings = Settings(kafka_bootstrap_servers=kafka.cluster.bootstrap_servers, **fields)
    topics = [fields["usage_topic"], fields["dlq_topic"], fields["alerts_topic"]]
    await ensure_topics(admin_settings, topics, partitions=2, replication_factor=1)
    for worker in Worker:
        await grant(kafka, USERS[worker], required_acls(Settings(**fields), worker))


# --- The start-up check, for every ACL of every worker ------------------------------------------


async def test_every_worker_is_granted_exactly_what_the_table_names(
    acl_kafka: AclKafka, names: Names
) -> None:
    for worker in Worker:
        settings = names.settings(acl_kafka, worker)
        await wait_for_refusals(settings, required_acls(settings, worker), [])
        started = time.monotonic()
        await require_permissions(settings, worker)
        # What it adds to a worker's start (a new login, two or three requests).
        assert time.monotonic() - started < 5
    # And nothing more: the API's user may not read what it writes, nor KEDA's fetch a record.
    api = names.settings(acl_kafka, Worker.API)
    assert (await check_acls(api, required_acls(api, Worker.USAGE))).denied
    # A topic that does not exist is no refusal (`require_topics` says it), to whoever may
    # know; to anyone else Kafka hides it behind a refusal.
    nowhere = Acl(Resource.TOPIC, unique("nowhere"), Operation.READ)
    admin = Settings(kafka_bootstrap_servers=acl_kafka.cluster.bootstrap_servers)
    assert await check_acls(admin, [nowhere]) == Refusals(denied=(), missing_topics=(nowhere.name,))
    assert (await check_acls(api, [nowhere])).denied == (nowhere,)


def _every_acl() -> list[tuple[Worker, int]]:
    defaults = Settings.model_construct()
    return [(w, i) for w in Worker for i in range(len(required_acls(defaults, w)))]


@pytest.mark.parametrize(
    ("worker", "index"),
    _every_acl(),
    ids=[
        f"{w}-{required_acls(Settings.model_construct(), w)[i]}".replace(" ", "_")
        for w, i in _every_acl()
    ],
)
async def test_without_any_one_acl_the_check_names_it_in_one_line(
    acl_kafka: AclKafka, names: Names, worker: Worker, index: int
) -> None:
    settings = names.settings(acl_kafka, worker)
    acls = required_acls(settings, worker)
    removed = acls[index]
    user = USERS[worker]
    await revoke(acl_kafka, user, removed)
    try:
        await wait_for_refusals(settings, acls, [removed])
        with pytest.raises(PermissionMissingError) as refused:
            await require_permissions(settings, worker)
    finally:
        await grant(acl_kafka, user, [removed])
        await wait_for_refusals(settings, acls, [])
    line = str(refused.value)
    assert "\n" not in line
    assert f"Kafka denies {removed.operation} on {removed.resource} {removed.name} " in line
    assert f"to user {user}" in line
    assert "docs/operations.md" in line


# --- Every worker, as a real process, with its own user and the least ACLs ---------------------


def worker_environment(
    kafka: AclKafka, names: Names, worker: Worker, database_url: str, **extra: str
) -> dict[str, str]:
    login = kafka.login(worker)
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("API_", "KAFKA_", "DATABASE_", "USAGE_", "DLQ_", "ALERTS_"))
    }
    return {
        **inherited,
        **{name.upper(): value for name, value in names.fields.items()},
        **{name.upper(): str(value) for name, value in login.items()},
        "DATABASE_URL": database_url,
        "METRICS_PORT": "0",
        "LOG_FORMAT": "json",
        "CONSUMER_POLL_TIMEOUT_MS": "100",
        "BUDGET_POLICY_SWEEP_SECONDS": "2",
        **extra,
    }


@dataclass(frozen=True)
class Finished:
    code: int
    stdout: str
    stderr: str

    def the_one_line(self) -> str:
        """The single line a refused start printed for a person, besides its JSON log lines."""
        assert self.code == 2, f"exit code {self.code}:\n{self.stderr[-3000:]}"
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        plain = [
            line for line in self.stderr.splitlines() if line.strip() and not line.startswith("{")
        ]
        assert len(plain) == 1, "\n".join(plain)
        assert plain[0].startswith("llm-usage: error: "), plain[0]
        return plain[0]


async def run_llm_usage(env: dict[str, str], *arguments: str, within: float = 120) -> Finished:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_usage", *arguments,
        env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), within)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(errors="replace"), stderr.decode())


@contextlib.asynccontextmanager
async def serving_api(env: dict[str, str]) -> AsyncIterator[str]:
    """`serve api` as a real process until the block ends (SIGTERM); yields its base URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_usage", "serve", "api",
        env={**env, "API_HOST": "127.0.0.1", "API_PORT": "0", "API_JWT_SECRET": SECRET,
             "API_JWT_AUDIENCE": AUDIENCE},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        port = None
        while port is None:
            line = await asyncio.wait_for(process.stderr.readline(), 60)
            assert line, "serve api exited before it listened"
            if line.startswith(b"{") and json.loads(line).get("event") == LISTENING:
                port = json.loads(line)["port"]
        yield f"http://127.0.0.1:{port}"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def set_monthly_policy(pool: asyncpg.Pool, tenant: str, limit: str) -> None:
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(
            "INSERT INTO budget_policies (tenant_id, scope_type, scope_id, monthly_limit_usd, "
            "warn_threshold_pct) VALUES ($1, 'tenant', $1, $2, 80)",
            tenant,
            Decimal(limit),
        )
        await connection.execute("SELECT pg_notify('budget_policies', $1)", tenant)


async def records_of(kafka: AclKafka, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic`, read through the admin door (PLAINTEXT)."""
    bootstrap = kafka.cluster.bootstrap_servers
    return await read_topic(bootstrap, topic, expected=await topic_record_count(bootstrap, topic))


async def test_each_worker_does_its_work_with_its_own_user_and_only_the_acls_of_the_table(
    acl_kafka: AclKafka, names: Names, database_url: str, pool: asyncpg.Pool
) -> None:
    usage, dlq, alerts = (names.fields[f"{t}_topic"] for t in ("usage", "dlq", "alerts"))
    admin_door = acl_kafka.cluster.bootstrap_servers
    tenant = unique("tenant")
    await set_monthly_policy(pool, tenant, "1.00")
    events = [usage_event(tenant, customer_charge_usd="0.10") for _ in range(10)]

    def env(worker: Worker, **extra: str) -> dict[str, str]:
        return worker_environment(acl_kafka, names, worker, database_url, **extra)

    # serve api (llm-usage-api: Write on the usage topic) ingests the events.
    async with serving_api(env(Worker.API)) as base, httpx.AsyncClient(base_url=base) as client:
        answer = await client.post(
            "/v1/usage-events", json=events, headers=bearer(token("platform-admin")), timeout=30
        )
    assert answer.status_code == 200, answer.text
    assert [r["status"] for r in answer.json()["results"]] == ["accepted"] * 10
    # One event the API would have refused, as a gateway could still publish it.
    invalid = usage_event(tenant, customer_charge_usd="-5")
    await produce(admin_door, usage, [(tenant.encode(), encode(invalid))])

    # consume usage (llm-usage-ingest) stores the ten and dead-letters the eleventh: its idempotent
    # producer's InitProducerId is granted by Write on the DLQ alone (no cluster IdempotentWrite).
    stored = await run_llm_usage(env(Worker.USAGE), "consume", "usage", "--exit-when-idle", "2")
    assert stored.code == 0, stored.stderr[-3000:]
    assert len(await stored_for(pool, [e["gateway_request_id"] for e in events])) == 10
    [letter] = [r for r in await records_of(acl_kafka, dlq) if r.key == tenant.encode()]

    # consume budget (llm-usage-budget) counts the spend and its relay publishes both alerts.
    for run in (1, 2):  # the second start's relay reads the alerts topic back (Read, no group)
        budget = await run_llm_usage(
            env(Worker.BUDGET), "consume", "budget", "--exit-when-idle", "3"
        )
        assert budget.code == 0, budget.stderr[-3000:]
        assert "This replica relays budget alerts." in budget.stderr, run
    levels = sorted(
        json.loads(r.value)["level"]
        for r in await records_of(acl_kafka, alerts)
        if r.key == tenant.encode()
    )
    assert levels == ["exceeded", "warning"]

    # dlq replay (llm-usage-operator) republishes the dead letter to the usage topic.
    before = await topic_record_count(admin_door, usage)
    replay = await run_llm_usage(
        env(Worker.OPERATOR),
        "dlq", "replay", "--partition", str(letter.partition),
        "--from-offset", str(letter.offset), "--to-offset", str(letter.offset),
    )  # fmt: skip
    assert replay.code == 0, replay.stderr[-3000:]
    assert "1 of 1 dead letters replayed" in replay.stdout
    assert await topic_record_count(admin_door, usage) == before + 1

    # KEDA (llm-usage-keda, Describe only) reads both groups' lag, and no record.
    keda = names.settings(acl_kafka, Worker.KEDA)
    admin = AIOKafkaAdminClient(**client_options(keda))
    await admin.start()
    try:
        for group in (keda.usage_group_id, keda.budget_group_id):
            committed = await admin.list_consumer_group_offsets(group)
            assert {tp.topic for tp in committed} == {usage}, group
    finally:
        await admin.close()
    reader = new_reader(keda)
    await reader.start()
    try:
        partitions = [TopicPartition(usage, p) for p in range(2)]
        ends = await reader.end_offsets(partitions)
        assert sum(ends.values()) == before + 1
        reader.assign(partitions)
        with pytest.raises(TopicAuthorizationFailedError):
            await reader.getmany(timeout_ms=3000)
    finally:
        await reader.stop()


# One removed ACL, and the real worker stops at start with one line naming it (the check's own
# cases above cover every ACL; these are the ones that would otherwise fail weeks later or
# crash-loop a whole deployment).
AT_START = {
    "usage consumer without DLQ Write": (Worker.USAGE, 2, ["consume", "usage"]),
    "budget consumer without alerts Read": (Worker.BUDGET, 3, ["consume", "budget"]),
    "usage consumer without group Read": (Worker.USAGE, 1, ["consume", "usage"]),
    "serve api without usage Write": (Worker.API, 0, ["serve", "api"]),
}


@pytest.mark.parametrize(("worker", "index", "command"), AT_START.values(), ids=list(AT_START))
async def test_a_worker_missing_one_acl_stops_at_start_with_one_line(  # noqa: PLR0917
    acl_kafka: AclKafka,
    names: Names,
    database_url: str,
    pool: asyncpg.Pool,  # the session database is migrated: the worker gets as far as Kafka
    worker: Worker,
    index: int,
    command: list[str],
) -> None:
    settings = names.settings(acl_kafka, worker)
    acls = required_acls(settings, worker)
    removed, user = acls[index], USERS[worker]
    env = worker_environment(
        acl_kafka, names, worker, database_url,
        API_HOST="127.0.0.1", API_PORT="0", API_JWT_SECRET=SECRET, API_JWT_AUDIENCE=AUDIENCE,
    )  # fmt: skip
    await revoke(acl_kafka, user, removed)
    try:
        await wait_for_refusals(settings, acls, [removed])
        started = time.monotonic()
        finished = await run_llm_usage(env, *command, within=60)
        took = time.monotonic() - started
    finally:
        await grant(acl_kafka, user, [removed])
        await wait_for_refusals(settings, acls, [])
    line = finished.the_one_line()
    assert f"Kafka denies {removed} to user {user}" in line, line
    assert took < 20, f"{took:.1f} s to refuse"
    assert acl_kafka.passwords[user] not in finished.stdout + finished.stderr
