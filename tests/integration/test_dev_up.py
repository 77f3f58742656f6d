"""`llm-usage dev up / env / down` as a developer runs them, each test in a state dir of its own.

Real JVMs and a real PostgreSQL; the Kafka jars come from the usual cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llm_usage.core.errors import LocalServiceError
from llm_usage.local.kafka import ensure_kafka_jars, free_port_block
from tests.integration.local_state import (
    LocalState,
    exports,
    local_state,
    occupied,
    wait_until_gone,
)
from tests.unavailable import service_unavailable


@pytest.fixture(scope="module")
def kafka_jars() -> Path:
    try:
        return ensure_kafka_jars()
    except LocalServiceError as error:
        service_unavailable(f"cannot run a local Kafka: {error}")


@pytest.fixture
def state(kafka_jars: Path) -> Iterator[LocalState]:
    with local_state() as state:
        yield state


def test_an_explicit_kafka_port_that_is_taken_fails_in_one_line_and_starts_nothing(
    state: LocalState,
) -> None:
    port = free_port_block(2)
    with occupied(port) as held:
        assert held
        finished = state.run("dev", "up", "--kafka-port", str(port))

    assert finished.returncode == 2, finished
    assert finished.error_lines == [
        f"llm-usage: error: port {port} on 127.0.0.1 is taken by another process "
        f"(--kafka-port {port} needs it); leave out --kafka-port to let `dev up` pick free "
        "ports, or pass another port"
    ]
    assert finished.stdout == ""
    assert state.processes() == {}
    assert not state.record.exists()
    assert not (state.path / "postgres").exists()  # not even started


def test_a_dev_up_whose_kafka_dies_while_starting_stops_postgres_and_claims_nothing(
    state: LocalState,
) -> None:
    # A broker JVM that dies at start-up: this option and the broker's own -XX:+UseG1GC select
    # two garbage collectors. The storage tool before it (-XX:+UseSerialGC) runs as usual, and
    # PostgreSQL starts beside it as always.
    finished = state.run(
        "dev",
        "up",
        "--kafka-port",
        str(free_port_block(2)),
        env={"JAVA_TOOL_OPTIONS": "-XX:+UseSerialGC"},
    )

    assert finished.returncode == 2, finished
    [line] = finished.error_lines
    assert line.startswith("llm-usage: error: Kafka node 0 exited while starting: "), line
    assert "Multiple garbage collectors selected" in line
    assert "Traceback" not in finished.stderr
    postgres_log = (state.path / "postgres" / "log").read_text()
    assert "database system is ready to accept connections" in postgres_log  # it did start…
    assert postgres_log.rstrip().endswith("database system is shut down")  # …and was stopped
    assert wait_until_gone(state) == {}
    assert not state.record.exists()
    env = state.run("dev", "env")
    assert (env.returncode, env.error_lines) == (
        2,
        ["llm-usage: error: nothing is running; run `llm-usage dev up`"],
    )


# `llm-usage dev up` without --kafka-port, as it behaves once the CLI passes no port when none is
# given (`dev_up`'s own default); run in a process of its own, as the command would be.
DEV_UP_WITHOUT_A_PORT = "from llm_usage.local.dev import dev_up; dev_up()"


def test_dev_up_without_a_port_avoids_a_taken_9092_and_dev_env_prints_the_ports_used(
    state: LocalState,
) -> None:
    with occupied(9092):  # or another process holds it already: taken either way
        up = state.python(DEV_UP_WITHOUT_A_PORT)
        assert up.returncode == 0, up

        kafka_port = json.loads(state.record.read_text())["kafka_port"]
        assert kafka_port not in (9092, 9093)
        assert up.stdout.splitlines() == [
            f"Kafka listens on 127.0.0.1:{kafka_port} (port 9092 is taken by another process; "
            "--kafka-port chooses one)",
            f"PostgreSQL listens on a Unix socket in {state.path / 'postgres'} and on no TCP "
            "port (a server on 5432 does not matter)",
        ]

        env = state.run("dev", "env")
        assert env.returncode == 0, env
        reached = exports(env.stdout)
        assert reached["KAFKA_BOOTSTRAP_SERVERS"] == f"127.0.0.1:{kafka_port}"
        assert reached["DATABASE_URL"] == json.loads(state.record.read_text())["database_url"]
        # What `eval "$(llm-usage dev env)"` gives a shell reaches both services.
        topics = state.run(
            "topics", "ensure", "--partitions", "1", env={**reached, "USAGE_TOPIC": "dev-up-check"}
        )
        assert topics.returncode == 0, topics
        assert "dev-up-check: created, 1 partitions" in topics.stdout
        migrated = state.run("migrate", env=reached)
        assert migrated.returncode == 0, migrated

        # Asking for the taken port explicitly fails, and leaves the running services alone.
        refused = state.run("dev", "up", "--kafka-port", "9092")
        assert refused.returncode == 2, refused
        assert refused.error_lines[0].startswith("llm-usage: error: port 9092 on 127.0.0.1")
        assert state.run("dev", "env").stdout == env.stdout

        # Again without a port: the running Kafka is kept, on its port.
        again = state.python(DEV_UP_WITHOUT_A_PORT)
        assert again.returncode == 0, again
        assert again.stdout.splitlines()[0] == f"Kafka already runs on 127.0.0.1:{kafka_port}"
        assert state.run("dev", "env").stdout == env.stdout

    down = state.run("dev", "down")
    assert down.returncode == 0, down
    assert wait_until_gone(state) == {}
    assert not state.record.exists()


def test_two_dev_ups_at_once_in_one_state_dir_share_one_kafka_and_one_postgresql(
    state: LocalState,
) -> None:
    """Two `make run` in two terminals: the second waits for the first and finds it running."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        ups = list(pool.map(lambda _: state.python(DEV_UP_WITHOUT_A_PORT), range(2)))

    for up in ups:
        assert up.returncode == 0, up
    kafka_lines = sorted(up.stdout.splitlines()[0] for up in ups)
    port = json.loads(state.record.read_text())["kafka_port"]
    assert kafka_lines[0] == f"Kafka already runs on 127.0.0.1:{port}", kafka_lines
    assert kafka_lines[1].startswith(f"Kafka listens on 127.0.0.1:{port}"), kafka_lines
    commands = list(state.processes().values())
    assert len([c for c in commands if " kafka.Kafka " in c]) == 1, commands
    assert len([c for c in commands if "bin/postgres -D " in c]) == 1, commands
