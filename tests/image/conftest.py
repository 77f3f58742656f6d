"""The project's image run the way a pod runs it, against the session's real Kafka and PostgreSQL.

These tests are run by `make image-test` (which builds the image first), not by `make test`:
their modules are named `image_*.py`, which pytest collects only when named on its command line.
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from tests.tools.containers import (
    IMAGE,
    ContainersUnavailableError,
    build_image,
    ensure_podman,
    image_exists,
)
from tests.unavailable import service_unavailable

# Where the PostgreSQL socket is mounted inside a container (the server listens on a Unix socket
# only; its data directory, where the socket lives, is closed to the container's user).
SOCKET_DIR_IN_CONTAINER = "/run/postgresql"
# What a pod's securityContext gives a worker: read-only root, /tmp as tmpfs (the emptyDir),
# uid 10001, no capabilities, no privilege gain; the host's network stands in for the pod's.
# No --init: `llm-usage` is PID 1, as on Kubernetes.
POD_LIKE = (
    "--network=host",
    "--read-only",
    "--tmpfs",
    "/tmp",  # noqa: S108 - the container's own /tmp, a tmpfs as the pod's emptyDir
    "--user",
    "10001:10001",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
)


def podman_command(*arguments: str) -> list[str]:
    return ["podman", "--runtime", "runc", *arguments]


def podman(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        podman_command(*arguments), capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def image() -> str:
    """The image `make image` built (built here if missing); podman usable, or the reason."""
    try:
        ensure_podman()
        if not image_exists(IMAGE):
            build_image(IMAGE)
        probe = podman("run", "--rm", *POD_LIKE, IMAGE, "--version", timeout=120)
    except (ContainersUnavailableError, OSError, subprocess.SubprocessError) as error:
        service_unavailable(f"podman cannot run the image here: {error}")
    if probe.returncode != 0:
        service_unavailable(
            f"podman cannot run the image here: exit {probe.returncode}: {probe.stderr.strip()}"
        )
    return IMAGE


@dataclass(frozen=True)
class Database:
    """The session's PostgreSQL as the host sees it and as a container sees it."""

    dsn: str
    container_dsn: str
    mounts: tuple[str, ...]


def container_database(dsn: str) -> Database:
    """The socket of a Unix-socket DSN mounted into the container; a TCP DSN as it is."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = (query.get("host") or [parts.hostname or ""])[0]
    if not host.startswith("/"):
        return Database(dsn=dsn, container_dsn=dsn, mounts=())
    port = (query.get("port") or [str(parts.port or 5432)])[0]
    name = f".s.PGSQL.{port}"
    socket_path = Path(host) / name
    container_dsn = (
        f"postgresql://{parts.username or 'postgres'}@{parts.path}"
        f"?host={quote(SOCKET_DIR_IN_CONTAINER)}&port={port}"
    )
    return Database(
        dsn=dsn,
        container_dsn=container_dsn,
        mounts=("--volume", f"{socket_path}:{SOCKET_DIR_IN_CONTAINER}/{name}"),
    )


@pytest.fixture(scope="session")
def database(database_url: str) -> Database:
    return container_database(database_url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))  # noqa: S104 - checking the port the workers bind
        except OSError:
            return False
    return True


@dataclass
class Container:
    """One container started detached; removed by the fixture that made it."""

    name: str
    command: Sequence[str]
    started: float = field(default_factory=time.monotonic)

    def logs(self) -> str:
        result = podman("logs", self.name)
        return result.stdout + result.stderr

    def state(self) -> tuple[str, int]:
        result = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.name)
        status, _, code = result.stdout.strip().partition(" ")
        return status, int(code or -1)

    def stop(self, grace: int) -> float:
        """`podman stop -t grace`; the seconds it took."""
        started = time.monotonic()
        result = podman("stop", "--time", str(grace), self.name, timeout=grace + 60)
        took = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        return took


class Containers:
    """Runs the image pod-like; every container it started is removed at the end."""

    def __init__(self, image: str, database: Database, environment: Mapping[str, str]) -> None:
        self.image = image
        self.database = database
        self.environment = dict(environment)
        self.started: list[Container] = []

    def _arguments(self, environment: Mapping[str, str]) -> list[str]:
        merged = {"DATABASE_URL": self.database.container_dsn, **self.environment, **environment}
        flags = [f"--env={key}={value}" for key, value in merged.items()]
        return [*POD_LIKE, *self.database.mounts, *flags, self.image]

    def run(
        self, *command: str, environment: Mapping[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """A one-shot command (migrate, topics ensure, policy set) to its end."""
        return podman("run", "--rm", *self._arguments(environment or {}), *command, timeout=timeout)

    def start(self, *command: str, environment: Mapping[str, str] | None = None) -> Container:
        name = f"llm-usage-test-{uuid.uuid4().hex[:8]}"
        result = podman(
            "run", "--detach", "--name", name, *self._arguments(environment or {}), *command
        )
        assert result.returncode == 0, result.stderr
        container = Container(name=name, command=command)
        self.started.append(container)
        return container

    def remove_all(self) -> None:
        for container in self.started:
            podman("rm", "--force", "--time", "0", container.name)


@pytest.fixture
def containers(
    image: str, database: Database, kafka_bootstrap_servers: str
) -> Iterator[Containers]:
    made = Containers(
        image,
        database,
        {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap_servers, "LOG_LEVEL": "INFO"},
    )
    try:
        yield made
    finally:
        made.remove_all()
