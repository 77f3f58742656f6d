"""`llm-usage dev up|down|env`: a local Kafka broker and PostgreSQL for development.

What `dev up` started is recorded in `<state dir>/dev.json`, so `down` and `env` work from any
shell; it names the ports actually used. Topics and migrations are the caller's business.

Ports: Kafka takes 9092 (and its controller 9093) when free, else a free block of ports, and
says which; `--kafka-port` asks for a fixed one and fails if it is taken. PostgreSQL opens no TCP
port at all (only a Unix socket in its data directory), so a server on 5432 does not matter.

A `dev up` that fails stops what it started and leaves no record that claims services; one
that fails before starting anything (an explicit port that is taken) changes nothing.

`dev up --citus` starts a Citus coordinator and two workers (llm_usage/local/citus.py, built
from the vendored source the first time, then cached) instead of the single PostgreSQL; the
database URL is the coordinator's. The two keep separate data; `dev up` with or without
`--citus` stops the other one if it runs.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_usage.core.errors import ConfigurationError, LocalServiceError
from llm_usage.local.citus import LocalCitusCluster
from llm_usage.local.kafka import (
    KafkaCluster,
    PortTakenError,
    free_port_block,
    ports_in_use,
)
from llm_usage.local.paths import exclusive_lock, state_dir
from llm_usage.local.postgres import LocalPostgres

_RECORD = "dev.json"
_LOCK = "dev.lock"
_NOTHING_RUNNING = "nothing is running; run `llm-usage dev up`"
DEFAULT_KAFKA_PORT = 9092
# A free port chosen by us can still be taken before the JVM binds it: choose again this often.
_PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class DevEnvironment:
    """How to reach the local services."""

    kafka_bootstrap_servers: str
    database_url: str

    def export_lines(self) -> str:
        """Shell lines that point the pipeline's commands at these services."""
        return (
            f"export KAFKA_BOOTSTRAP_SERVERS={shlex.quote(self.kafka_bootstrap_servers)}\n"
            f"export DATABASE_URL={shlex.quote(self.database_url)}"
        )


def dev_up(
    *,
    kafka_port: int | None = None,
    nodes: int = 1,
    citus: bool = False,
    say: Callable[[str], None] = print,
) -> DevEnvironment:
    """Start the local Kafka (1 or 3 nodes) and PostgreSQL, or find them running; record them.

    `kafka_port` None: keep the port of a Kafka that already runs, else 9092 when it (and the
    ports after it) are free, else free ports. A given `kafka_port` that another process holds
    raises LocalServiceError before anything is started or stopped. `say` gets one line per
    service for people: where it listens.

    Kafka's storage is formatted afresh whenever its JVMs are (re)launched; PostgreSQL keeps its
    data between runs.
    """
    if kafka_port is not None and not 1 <= kafka_port <= 65536 - 2 * nodes:
        raise ConfigurationError(
            f"--kafka-port {kafka_port} is out of range: Kafka needs {2 * nodes} ports from it, "
            f"all at most 65535; pass a port from 1 to {65536 - 2 * nodes}, or leave it out"
        )
    root = state_dir()
    # Two `dev up` (two `make run` in two terminals) at once would launch two brokers into one
    # state dir: the second waits, then finds the first's services running.
    with exclusive_lock(root / _LOCK):
        return _dev_up(root, kafka_port, nodes, citus, say)


def _dev_up(
    root: Path, kafka_port: int | None, nodes: int, citus: bool, say: Callable[[str], None]
) -> DevEnvironment:
    previous = _read_record(root)
    running = previous if previous is not None and _kafka(root, previous).is_running() else None
    reusable = (
        running is not None
        and int(running["nodes"]) == nodes
        and kafka_port in (None, int(running["kafka_port"]))
    )
    if kafka_port is not None and not reusable:
        replaced = None if running is None else _kafka(root, running)
        _check_port_is_free(kafka_port, nodes, replaced=replaced)
    if previous is not None and not reusable:
        _kafka(root, previous).stop()  # to be replaced: another port or node count
    verb, why = "listens on", ""
    if reusable:
        assert running is not None
        port, verb = int(running["kafka_port"]), "already runs on"
    elif kafka_port is not None:
        port = kafka_port
    else:
        port, why = _choose_kafka_port(nodes)

    postgres = _database(root, citus=citus)
    _database(root, citus=not citus).stop()  # the other kind, if it runs
    if citus:
        say("Citus: a coordinator and two workers (built once and cached: a minute the first time)")
    kafka = _start_services(
        root, port=port, nodes=nodes, fixed=kafka_port is not None, postgres=postgres
    )
    database_url = postgres.dsn
    _write_record(
        root,
        {
            "kafka_port": kafka.port,
            "nodes": nodes,
            "ready": True,
            "database_url": database_url,
            "citus": citus,
        },
    )
    if kafka.port != port:
        why = f" (port {port} was taken meanwhile)"
    say(f"Kafka {verb} {kafka.bootstrap_servers}{why}")
    what = "the Citus coordinator (workers beside it)" if citus else "PostgreSQL"
    say(
        f"{what} listens on a Unix socket in {postgres.socket_dir} and on no TCP port "
        "(a server on 5432 does not matter)"
    )
    return DevEnvironment(kafka.bootstrap_servers, database_url)


def dev_down() -> None:
    """Stop what `dev up` started; harmless when nothing runs."""
    root = state_dir()
    with exclusive_lock(root / _LOCK):
        record = _read_record(root) or {"kafka_port": DEFAULT_KAFKA_PORT, "nodes": 1}
        _kafka(root, record).stop()
        _postgres(root).stop()
        _citus(root).stop()
        (root / _RECORD).unlink(missing_ok=True)


def dev_env() -> DevEnvironment:
    """How to reach what `dev up` started; LocalServiceError if it is not running."""
    root = state_dir()
    record = _read_record(root)
    if record is None or not record.get("ready"):
        raise LocalServiceError(_NOTHING_RUNNING)
    kafka, postgres = _kafka(root, record), _database(root, citus=bool(record.get("citus")))
    if not (kafka.is_running() and postgres.is_running()):
        raise LocalServiceError(
            "the local Kafka or PostgreSQL has stopped; run `llm-usage dev up` again"
        )
    return DevEnvironment(kafka.bootstrap_servers, str(record["database_url"]))


def _check_port_is_free(port: int, nodes: int, *, replaced: KafkaCluster | None) -> None:
    """An explicitly asked-for port must be free, or held by our own Kafka about to be replaced."""
    ours = set(replaced.ports) if replaced is not None else set()
    busy = [p for p in ports_in_use(range(port, port + 2 * nodes)) if p not in ours]
    if busy:
        raise LocalServiceError(_port_taken(busy[0], port))


def _port_taken(taken: int, asked: int) -> str:
    return (
        f"port {taken} on 127.0.0.1 is taken by another process (--kafka-port {asked} needs it); "
        "leave out --kafka-port to let `dev up` pick free ports, or pass another port"
    )


def _choose_kafka_port(nodes: int) -> tuple[int, str]:
    """9092 when it and the ports after it are free, else a free block; and why, for people."""
    busy = ports_in_use(range(DEFAULT_KAFKA_PORT, DEFAULT_KAFKA_PORT + 2 * nodes))
    if not busy:
        return DEFAULT_KAFKA_PORT, ""
    why = f" (port {busy[0]} is taken by another process; --kafka-port chooses one)"
    return free_port_block(2 * nodes), why


def _start_services(
    root: Path, *, port: int, nodes: int, fixed: bool, postgres: LocalPostgres | LocalCitusCluster
) -> KafkaCluster:
    """Start Kafka and PostgreSQL side by side; on any failure stop both and drop the record.

    The record is written before starting, so that `dev down` finds what a `dev up` that was
    killed outright left running.
    """
    _write_record(root, {"kafka_port": port, "nodes": nodes, "ready": False})
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dev-up")
    try:
        try:
            kafka_job = pool.submit(_start_kafka, root, port, nodes, fixed)
            postgres_job = pool.submit(postgres.start)
            kafka = kafka_job.result()
            postgres_job.result()
        finally:
            pool.shutdown(wait=True)  # interrupted or not: both are done before any clean-up
    except BaseException as error:
        problem = _tear_down(root, postgres)
        if problem is not None and isinstance(error, LocalServiceError):
            raise LocalServiceError(
                f"{error}; stopping what was started failed too ({problem}): "
                "run `llm-usage dev down`"
            ) from None
        raise
    return kafka


def _start_kafka(root: Path, port: int, nodes: int, fixed: bool) -> KafkaCluster:
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        kafka = _kafka(root, {"kafka_port": port, "nodes": nodes})
        try:
            kafka.start()
        except PortTakenError as error:
            if fixed:
                raise LocalServiceError(_port_taken(error.port, port)) from None
            if attempt == _PORT_ATTEMPTS:
                raise
            port = free_port_block(2 * nodes)
            _write_record(root, {"kafka_port": port, "nodes": nodes, "ready": False})
        else:
            return kafka
    raise AssertionError("unreachable: the last attempt returns or raises")


def _tear_down(root: Path, postgres: LocalPostgres | LocalCitusCluster) -> str | None:
    """Stop what a failed start left running, then drop the record; else say what failed."""
    record = _read_record(root)
    stops = [postgres.stop] if record is None else [_kafka(root, record).stop, postgres.stop]
    problems = []
    for stop in stops:
        try:
            stop()
        except LocalServiceError as error:
            problems.append(str(error))
    if problems:
        return problems[0]  # the record stays, so that `dev down` can try again
    (root / _RECORD).unlink(missing_ok=True)
    return None


def _kafka(root: Path, record: dict[str, Any]) -> KafkaCluster:
    return KafkaCluster(
        state_dir=root / "kafka", nodes=int(record["nodes"]), port=int(record["kafka_port"])
    )


def _postgres(root: Path) -> LocalPostgres:
    return LocalPostgres(data_dir=root / "postgres")


def _citus(root: Path) -> LocalCitusCluster:
    return LocalCitusCluster(state_dir=root / "citus")


def _database(root: Path, *, citus: bool) -> LocalPostgres | LocalCitusCluster:
    return _citus(root) if citus else _postgres(root)


def _read_record(root: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((root / _RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not {"kafka_port", "nodes"} <= record.keys():
        return None
    return record


def _write_record(root: Path, record: dict[str, Any]) -> None:
    staging = root / f"{_RECORD}.tmp"
    staging.write_text(json.dumps(record, indent=2) + "\n")
    staging.replace(root / _RECORD)
