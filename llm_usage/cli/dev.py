"""`llm-usage dev up|down|env`: a local Kafka broker and PostgreSQL for development.

What `dev up` started is recorded in `<state dir>/dev.json`, so `down` and `env` work from any
shell. Topics and migrations are the caller's business.
"""

from __future__ import annotations

import json
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_usage.core.errors import LocalServiceError
from llm_usage.deploy.local.kafka import KafkaCluster
from llm_usage.deploy.local.paths import state_dir
from llm_usage.deploy.local.postgres import LocalPostgres

_RECORD = "dev.json"
_NOTHING_RUNNING = "nothing is running; run `llm-usage dev up`"


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


def dev_up(*, kafka_port: int = 9092, nodes: int = 1) -> DevEnvironment:
    """Start the local Kafka (1 or 3 nodes) and PostgreSQL, or find them running; record them.

    Kafka's storage is formatted afresh whenever its JVMs are (re)launched; PostgreSQL keeps its
    data between runs.
    """
    root = state_dir()
    previous = _read_record(root)
    if previous is not None and (previous["kafka_port"], previous["nodes"]) != (kafka_port, nodes):
        _kafka(root, previous).stop()
    record: dict[str, Any] = {"kafka_port": kafka_port, "nodes": nodes, "ready": False}
    # Written before starting, so that `dev down` finds what a failed `dev up` left running.
    _write_record(root, record)
    kafka = _kafka(root, record)
    postgres = _postgres(root)
    with ThreadPoolExecutor(max_workers=2) as pool:
        kafka_started = pool.submit(kafka.start)
        database_url = pool.submit(postgres.start).result()
        kafka_started.result()
    environment = DevEnvironment(kafka.bootstrap_servers, database_url)
    _write_record(root, record | {"ready": True, "database_url": database_url})
    return environment


def dev_down() -> None:
    """Stop what `dev up` started; harmless when nothing runs."""
    root = state_dir()
    record = _read_record(root) or {"kafka_port": 9092, "nodes": 1}
    _kafka(root, record).stop()
    _postgres(root).stop()
    (root / _RECORD).unlink(missing_ok=True)


def dev_env() -> DevEnvironment:
    """How to reach what `dev up` started; LocalServiceError if it is not running."""
    root = state_dir()
    record = _read_record(root)
    if record is None or not record.get("ready"):
        raise LocalServiceError(_NOTHING_RUNNING)
    kafka, postgres = _kafka(root, record), _postgres(root)
    if not (kafka.is_running() and postgres.is_running()):
        raise LocalServiceError(
            "the local Kafka or PostgreSQL has stopped; run `llm-usage dev up` again"
        )
    return DevEnvironment(kafka.bootstrap_servers, str(record["database_url"]))


def _kafka(root: Path, record: dict[str, Any]) -> KafkaCluster:
    return KafkaCluster(
        state_dir=root / "kafka", nodes=int(record["nodes"]), port=int(record["kafka_port"])
    )


def _postgres(root: Path) -> LocalPostgres:
    return LocalPostgres(data_dir=root / "postgres")


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
