"""The Kafka permissions each worker needs: one table, and the Strimzi `KafkaUser`s rendered
from it (llm_usage/kafka/authorization.py checks the same table against the broker at start).

The table is the least a worker needs, read from the requests each one sends (aiokafka):

- a group member (`consume usage`, `consume budget`): FindCoordinator, OffsetFetch (group
  Describe), JoinGroup, SyncGroup, Heartbeat, OffsetCommit, LeaveGroup (group Read); Metadata,
  ListOffsets (topic Describe) and Fetch (topic Read) on the usage topic;
- the idempotent producers: Produce (topic Write) and InitProducerId without a transactional id,
  which brokers from 2.8 on grant to anyone with Write on some topic (KIP-679): no cluster
  `IdempotentWrite`;
- the budget relay reads the alerts topic back, outside any group (Metadata, ListOffsets, Fetch);
- KEDA's Kafka scaler reads the groups' committed offsets and the topic's end offsets
  (OffsetFetch, ListOffsets, Metadata): Describe only;
- `dlq replay` reads the dead-letter topic outside any group and republishes to the usage topic.

Kafka grants Describe with Read, Write, Delete or Alter on the same resource, so a resource that
gets Read or Write gets no separate Describe: every ACL in the table is one the worker cannot
start without (tests/integration/test_kafka_acls.py removes each in turn on a real broker).

`python -m llm_usage.kafka.permissions --strimzi DIR` writes the KafkaUser manifests (DIR is
deploy/k8s/kafka-users in this repository); `--table` prints the table in Markdown.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from pathlib import Path

from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import Settings

# The Strimzi Kafka cluster (its `strimzi.io/cluster` label) the manifests name.
STRIMZI_CLUSTER = "kafka"
# Where its User Operator watches by default (the cluster's own namespace).
KAFKA_NAMESPACE = "kafka"
SEE = "see docs/operations.md#kafka-users-and-acls"


class Worker(StrEnum):
    """Who connects to Kafka with a login of its own. The rollup touches no Kafka."""

    USAGE = "usage"
    BUDGET = "budget"
    API = "api"
    OPERATOR = "operator"
    KEDA = "keda"


# The KafkaUser (and so the SCRAM user name, and the Secret Strimzi writes) of each worker.
USERS: dict[Worker, str] = {
    Worker.USAGE: "llm-usage-ingest",
    Worker.BUDGET: "llm-usage-budget",
    Worker.API: "llm-usage-api",
    Worker.OPERATOR: "llm-usage-operator",
    Worker.KEDA: "llm-usage-keda",
}

_WHAT: dict[Worker, str] = {
    Worker.USAGE: "`consume usage`",
    Worker.BUDGET: "`consume budget` (and its alert relay)",
    Worker.API: "`serve api`",
    Worker.OPERATOR: "`dlq replay` (a person, by hand)",
    Worker.KEDA: "KEDA's Kafka scaler (lag)",
}


class Resource(StrEnum):
    TOPIC = "topic"
    GROUP = "group"


class Operation(StrEnum):
    READ = "Read"
    WRITE = "Write"
    DESCRIBE = "Describe"


class _ResourceCode(IntEnum):
    """Kafka's ResourceType codes (the ACL and DescribeAcls wire values)."""

    TOPIC = 2
    GROUP = 3


class _OperationCode(IntEnum):
    """Kafka's AclOperation codes; an `authorized_operations` bit field sets bit `1 << code`."""

    READ = 3
    WRITE = 4
    DESCRIBE = 8


@dataclass(frozen=True, order=True)
class Acl:
    """One allow rule for one worker: `operation` on the literal resource `name`."""

    resource: Resource
    name: str
    operation: Operation
    why: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.operation} on {self.resource} {self.name}"

    @property
    def resource_code(self) -> int:
        return _ResourceCode[self.resource.name].value

    @property
    def operation_code(self) -> int:
        return _OperationCode[self.operation.name].value


def required_acls(settings: Settings, worker: Worker) -> tuple[Acl, ...]:
    """What `worker` needs, for the topic and group names `settings` give."""
    topic, group = Resource.TOPIC, Resource.GROUP
    read, write, describe = Operation.READ, Operation.WRITE, Operation.DESCRIBE
    usage, dlq, alerts = settings.usage_topic, settings.dlq_topic, settings.alerts_topic
    table: dict[Worker, tuple[Acl, ...]] = {
        Worker.USAGE: (
            Acl(topic, usage, read, "fetch the usage events (Describe comes with it)"),
            Acl(group, settings.usage_group_id, read, "join the group, commit offsets"),
            Acl(topic, dlq, write, "dead-letter invalid events (InitProducerId too, KIP-679)"),
        ),
        Worker.BUDGET: (
            Acl(topic, usage, read, "fetch the usage events"),
            Acl(group, settings.budget_group_id, read, "join the group, commit offsets"),
            Acl(topic, alerts, write, "publish budget alerts"),
            Acl(topic, alerts, read, "a relay taking over reads the alerts topic back (no group)"),
        ),
        Worker.API: (Acl(topic, usage, write, "publish ingested usage events"),),
        Worker.OPERATOR: (
            Acl(topic, dlq, read, "read dead letters (no group)"),
            Acl(topic, usage, write, "republish them"),
        ),
        Worker.KEDA: (
            Acl(topic, usage, describe, "partitions and end offsets"),
            Acl(group, settings.usage_group_id, describe, "committed offsets"),
            Acl(group, settings.budget_group_id, describe, "committed offsets"),
        ),
    }
    return table[worker]


# --- The KafkaUser manifests -------------------------------------------------------------------


def kafka_user_manifest(
    settings: Settings, worker: Worker, *, cluster: str = STRIMZI_CLUSTER
) -> str:
    """A Strimzi `KafkaUser` (kafka.strimzi.io/v1) for `worker`: SCRAM-SHA-512, simple ACLs.

    Written by hand, not by a YAML library (the package does not ship one): names are plain
    scalars, which `_plain` checks.
    """
    grouped: dict[tuple[Resource, str], list[Operation]] = {}
    for acl in required_acls(settings, worker):
        grouped.setdefault((acl.resource, acl.name), []).append(acl.operation)
    lines = [
        f"# {_WHAT[worker]}: the least ACLs it needs. Generated from",
        "# llm_usage/kafka/permissions.py (`python -m llm_usage.kafka.permissions --strimzi",
        "# deploy/k8s/kafka-users`); do not edit by hand.",
        "apiVersion: kafka.strimzi.io/v1",
        "kind: KafkaUser",
        "metadata:",
        f"  name: {_plain(USERS[worker])}",
        "  labels:",
        f"    strimzi.io/cluster: {_plain(cluster)}",
        "    app.kubernetes.io/part-of: llm-usage-pipeline",
        "spec:",
        "  authentication:",
        "    type: scram-sha-512",
        "  authorization:",
        "    type: simple",
        "    acls:",
    ]
    for (resource, name), operations in grouped.items():
        lines += [
            "      - resource:",
            f"          type: {resource.value}",
            f"          name: {_plain(name)}",
            "          patternType: literal",
            f"        operations: [{', '.join(op.value for op in sorted(operations))}]",
        ]
    return "\n".join(lines) + "\n"


def kafka_user_files(
    settings: Settings, *, cluster: str = STRIMZI_CLUSTER, namespace: str = KAFKA_NAMESPACE
) -> dict[str, str]:
    """Every file of deploy/k8s/kafka-users: one KafkaUser per worker and the kustomization."""
    files = {
        f"{USERS[worker]}.yaml": kafka_user_manifest(settings, worker, cluster=cluster)
        for worker in Worker
    }
    header = (
        "One KafkaUser per worker that talks to Kafka (SCRAM-SHA-512, the least ACLs), in the",
        "namespace Strimzi's User Operator watches (the Kafka cluster's by default; if yours",
        "watches another, a kustomization of your own with that `namespace` moves them). It",
        "writes each user's password into a Secret named like the user, key `password`;",
        "docs/operations.md (Kafka users and ACLs) says how those reach the pipeline's",
        "namespace.",
        "  kubectl apply -k deploy/k8s/kafka-users",
        "Generated from llm_usage/kafka/permissions.py; do not edit by hand.",
    )
    files["kustomization.yaml"] = (
        "".join(f"# {line}\n" for line in header)
        + "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        + "kind: Kustomization\n"
        + f"namespace: {_plain(namespace)}\n"
        + "resources:\n"
        + "".join(f"  - {name}\n" for name in sorted(files))
    )
    return files


def markdown_table(settings: Settings) -> str:
    """The table for operators (docs/operations.md)."""
    rows = ["| KafkaUser | who | resource | operation | why |", "| --- | --- | --- | --- | --- |"]
    for worker in Worker:
        for acl in required_acls(settings, worker):
            rows.append(
                f"| `{USERS[worker]}` | {_WHAT[worker]} | {acl.resource} `{acl.name}` "
                f"| {acl.operation} | {acl.why} |"
            )
    return "\n".join(rows) + "\n"


def _plain(word: str) -> str:
    if not word or not all(c.isalnum() or c in "._-" for c in word) or word[0] in ".-":
        raise ConfigurationError(
            f"{word!r} cannot be written as a KafkaUser name or resource; use letters, digits, "
            "'.', '_' and '-'"
        )
    return word


# --- The generator -------------------------------------------------------------------------------


def write_kafka_users(directory: Path, settings: Settings) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in kafka_user_files(settings).items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm_usage.kafka.permissions",
        description="The Kafka ACLs each worker needs, for the default topic and group names.",
    )
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--strimzi", type=Path, metavar="DIR", help="write the KafkaUser manifests")
    out.add_argument("--table", action="store_true", help="print the table in Markdown")
    args = parser.parse_args(None if argv is None else list(argv))
    settings = Settings.model_construct()  # the defaults, not this machine's environment
    if args.table:
        sys.stdout.write(markdown_table(settings))
    else:
        for path in write_kafka_users(args.strimzi, settings):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
