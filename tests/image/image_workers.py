"""Every command of the image, run as a pod runs it (read-only root, /tmp a tmpfs, uid 10001, no
capabilities, no init: `llm-usage` is PID 1), against the session's real Kafka and PostgreSQL.

Events published to the usage topic are stored, a budget alert reaches the alerts topic, the
probes answer on the ports the manifests probe, and `podman stop` with the manifests' grace ends
each worker with exit 0 inside the documented 30 s drain. Each stop is measured and printed.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.image.conftest import Container, Containers, free_port, podman, port_is_free
from tests.integration.pipeline import (
    committed_offsets,
    encode,
    produce,
    read_topic,
    unique,
    usage_event,
)

ROOT = Path(__file__).parents[2]
# What the workers promise (docs/operations.md): a SIGTERM drains within 30 s.
DRAIN_BOUND_SECONDS = 30.0
# How soon a one-shot command must end once stopped (without a handler, `migrate` stuck on a
# silent server ends only at its own 10 s connect timeout, ~6 s after the SIGTERM).
ONE_SHOT_STOP_SECONDS = 4.0
STOP_TIMES: dict[str, float] = {}


def manifest_grace_seconds(manifest: str) -> int:
    """terminationGracePeriodSeconds of deploy/k8s/base/`manifest` (Kubernetes' 30 s if unset)."""
    path = ROOT / "deploy" / "k8s" / "base" / manifest
    found = re.findall(r"terminationGracePeriodSeconds:\s*(\d+)", path.read_text())
    return int(found[0]) if found else 30


@pytest.fixture(scope="module", autouse=True)
def stop_time_summary() -> Iterator[None]:
    yield
    if STOP_TIMES:
        lines = [f"  {name:<28} {took:5.1f} s" for name, took in STOP_TIMES.items()]
        print(  # noqa: T201 - the figures `make image-test` reports
            f"\n`podman stop` of each container (drain bound {DRAIN_BOUND_SECONDS:.0f} s):\n"
            + "\n".join(lines)
        )


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


def wait_ready(container: Container, port: int, *, within: float = 60) -> None:
    """/readyz answers 200 on `port`; fail with the container's log otherwise."""
    deadline = time.monotonic() + within
    last = "no answer"
    while time.monotonic() < deadline:
        status, _ = container.state()
        if status != "running":
            pytest.fail(f"{' '.join(container.command)} exited early:\n{container.logs()}")
        try:
            code, body = http_get(f"http://127.0.0.1:{port}/readyz")
            if code == 200:
                return
            last = f"{code} {body[:200]}"
        except OSError as error:
            last = str(error)
        time.sleep(0.5)
    pytest.fail(f"{' '.join(container.command)} not ready on {port}: {last}\n{container.logs()}")


def check_probes(port: int, metric: str) -> None:
    for path in ("/healthz", "/readyz"):
        code, body = http_get(f"http://127.0.0.1:{port}{path}")
        assert code == 200, f"{path}: {code} {body[:300]}"
    code, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200
    assert metric in body, f"/metrics lacks {metric}"


def stop_cleanly(container: Container, label: str, manifest: str) -> float:
    """`podman stop` with the manifest's grace: exit 0 (no SIGKILL), inside the drain bound."""
    grace = manifest_grace_seconds(manifest)
    took = container.stop(grace)
    STOP_TIMES[label] = took
    print(f"\n{label}: `podman stop -t {grace}` took {took:.1f} s")  # noqa: T201 - the figure
    status, code = container.state()
    logs = container.logs()
    assert status == "exited", status
    assert code == 0, f"{label} exited {code} (137: SIGKILL after the grace):\n{logs[-3000:]}"
    assert took <= DRAIN_BOUND_SECONDS, f"{label} took {took:.1f} s to stop:\n{logs[-3000:]}"
    return took


def worker_port() -> int:
    """9108, the port the image sets and the manifests probe; another one only if 9108 is
    taken on this machine (a developer's own worker)."""
    if port_is_free(9108):
        return 9108
    port = free_port()
    print(f"\n9108 is taken here: the workers use METRICS_PORT={port}")  # noqa: T201
    return port


def test_migrate_topics_and_every_worker_run_as_a_pod_runs_them(
    containers: Containers, kafka_bootstrap_servers: str, database_url: str
) -> None:
    base = unique("img")
    tenant = unique("tenant")
    topics = {
        "USAGE_TOPIC": f"{base}.usage",
        "DLQ_TOPIC": f"{base}.usage.dlq",
        "ALERTS_TOPIC": f"{base}.alerts",
        "USAGE_GROUP_ID": f"{base}.group",
        "BUDGET_GROUP_ID": f"{base}.budget",
    }
    containers.environment.update(topics)

    migrated = containers.run("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert re.match(r"applied |database is up to date", migrated.stdout), migrated.stdout

    ensured = containers.run("topics", "ensure", "--partitions", "3", "--replication-factor", "1")
    assert ensured.returncode == 0, ensured.stderr
    for name in (topics["USAGE_TOPIC"], topics["DLQ_TOPIC"], topics["ALERTS_TOPIC"]):
        assert f"{name}: created, 3 partitions" in ensured.stdout, ensured.stdout

    policy = containers.run(
        "policy", "set", "--tenant", tenant, "--scope", "tenant", "--monthly-limit-usd", "0.01",
        "--actor", "image-test",
    )  # fmt: skip
    assert policy.returncode == 0, policy.stderr + policy.stdout

    # Three events of $0.0054: $0.0162 against a $0.01 monthly limit.
    events = [usage_event(tenant) for _ in range(3)]
    asyncio.run(
        produce(
            kafka_bootstrap_servers,
            topics["USAGE_TOPIC"],
            [(tenant.encode(), encode(event)) for event in events],
        )
    )
    port = worker_port()
    probes = {"METRICS_PORT": str(port)}

    usage = containers.start("consume", "usage", environment=probes)
    wait_ready(usage, port)
    ids = [event["gateway_request_id"] for event in events]
    stored = asyncio.run(wait_for_rows(database_url, ids))
    assert stored == len(ids), f"{stored} of {len(ids)} events stored:\n{usage.logs()[-3000:]}"
    check_probes(port, "llm_usage_")
    stop_cleanly(usage, "consume usage", "consume-usage.yaml")

    budget = containers.start("consume", "budget", environment=probes)
    wait_ready(budget, port)
    alerts = asyncio.run(read_topic(kafka_bootstrap_servers, topics["ALERTS_TOPIC"], expected=1))
    assert alerts, f"no alert on {topics['ALERTS_TOPIC']}:\n{budget.logs()[-3000:]}"
    assert any(tenant.encode() in (record.value or b"") for record in alerts)
    check_probes(port, "llm_usage_")
    stop_cleanly(budget, "consume budget", "consume-budget.yaml")

    rollup = containers.start("rollup", "schedule", environment=probes)
    wait_ready(rollup, port)
    check_probes(port, "llm_usage_")
    stop_cleanly(rollup, "rollup schedule", "rollup-schedule.yaml")

    api_port = free_port()
    api = containers.start(
        "serve",
        "api",
        environment={"API_PORT": str(api_port), "API_JWT_SECRET": "image-test-" + "x" * 32},
    )
    wait_ready(api, api_port)
    check_probes(api_port, "llm_usage_api_")
    stop_cleanly(api, "serve api", "api.yaml")


async def wait_for_rows(database_url: str, ids: list[str], within: float = 60) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + within
        while True:
            found = await connection.fetchval(
                "SELECT count(*) FROM llm_usage_events WHERE gateway_request_id = ANY($1::text[])",
                ids,
            )
            if found == len(ids) or time.monotonic() > deadline:
                return int(found)
            await asyncio.sleep(0.5)
    finally:
        await connection.close()


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never answers: a command waiting on it is stuck."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


@dataclass(frozen=True)
class Stuck:
    """A one-shot command pointed at a server that never answers."""

    command: tuple[str, ...]
    variable: str
    address: str

    @property
    def line(self) -> str:
        return " ".join(self.command)


@pytest.mark.parametrize(
    "case",
    [
        Stuck(("migrate",), "DATABASE_URL", "postgresql://postgres@127.0.0.1:{port}/x"),
        Stuck(("topics", "ensure"), "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:{port}"),
    ],
    ids=lambda case: case.line,
)
def test_a_one_shot_command_as_pid_1_ends_at_sigterm(
    containers: Containers, black_hole: int, case: Stuck
) -> None:
    command, line = case.command, case.line
    stuck = containers.start(
        *command, environment={case.variable: case.address.format(port=black_hole)}
    )
    time.sleep(4)  # past the imports: the command waits on the black hole
    status, _ = stuck.state()
    assert status == "running", f"{line} did not wait on the black hole:\n{stuck.logs()}"

    took = stuck.stop(manifest_grace_seconds("migrate-job.yaml"))
    STOP_TIMES[line] = took
    print(f"\n{line} (stuck on a silent server): stopped in {took:.1f} s")  # noqa: T201

    _, code = stuck.state()
    logs = stuck.logs()
    assert took < ONE_SHOT_STOP_SECONDS, f"{line} ignored SIGTERM as PID 1 ({took:.1f} s)"
    assert code == 1, f"{line} exited {code}:\n{logs}"
    assert f"llm-usage: stopped: {line} stopped by SIGTERM" in logs, logs
    assert "Traceback" not in logs


def test_the_runtime_environment_carries_no_installer(containers: Containers) -> None:
    """pip and setuptools left the image's venv: nothing can be installed at run time."""
    found = podman(
        "run", "--rm", "--entrypoint", "python", containers.image, "-c",
        "import importlib.util as u; print([m for m in ('pip', 'setuptools') if u.find_spec(m)])",
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"


BUSY_EVENTS = 100_000


@pytest.mark.parametrize(
    ("command", "manifest"),
    [(("consume", "usage"), "consume-usage.yaml"), (("consume", "budget"), "consume-budget.yaml")],
    ids=["consume usage", "consume budget"],
)
def test_a_busy_consumer_stops_inside_the_drain_bound(
    containers: Containers, kafka_bootstrap_servers: str, command: tuple[str, str], manifest: str
) -> None:
    """Stopped in the middle of a backlog (the SIGTERM lands mid-batch), as a rollout does."""
    base = unique("busy")
    topics = {
        "USAGE_TOPIC": f"{base}.usage",
        "DLQ_TOPIC": f"{base}.usage.dlq",
        "ALERTS_TOPIC": f"{base}.alerts",
        "USAGE_GROUP_ID": f"{base}.group",
        "BUDGET_GROUP_ID": f"{base}.budget",
    }
    containers.environment.update(topics)
    assert containers.run("migrate").returncode == 0
    ensured = containers.run("topics", "ensure", "--partitions", "3", "--replication-factor", "1")
    assert ensured.returncode == 0, ensured.stderr
    tenants = [unique("tenant") for _ in range(50)]
    records = []
    for index in range(BUSY_EVENTS):
        tenant = tenants[index % len(tenants)]
        records.append((tenant.encode(), encode(usage_event(tenant))))
    started = time.monotonic()
    asyncio.run(produce(kafka_bootstrap_servers, topics["USAGE_TOPIC"], records))
    print(f"\n{BUSY_EVENTS} events produced in {time.monotonic() - started:.1f} s")  # noqa: T201

    port = worker_port()
    busy = containers.start(*command, environment={"METRICS_PORT": str(port)})
    wait_ready(busy, port)
    time.sleep(0.5)  # inside the backlog
    label = f"{' '.join(command)} (busy)"
    stop_cleanly(busy, label, manifest)
    group = topics["USAGE_GROUP_ID" if command[1] == "usage" else "BUDGET_GROUP_ID"]
    committed = asyncio.run(
        committed_offsets(kafka_bootstrap_servers, group, topics["USAGE_TOPIC"])
    )
    done = sum(committed.values())
    print(f"{label}: {done} of {BUSY_EVENTS} records committed at the stop")  # noqa: T201
    assert done < BUSY_EVENTS, "the backlog was gone before the stop: not a busy stop"
