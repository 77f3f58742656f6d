"""deploy/k8s/kafka-users: one Strimzi KafkaUser per worker, exactly what the ACL table of
llm_usage/kafka/permissions.py renders for the default names, valid against Strimzi's CRD
schema, and named as the manifests reference their Secrets."""

from __future__ import annotations

import subprocess
from functools import cache
from typing import Any

import jsonschema
import pytest
import yaml

from llm_usage.core.errors import LocalServiceError
from llm_usage.core.settings import Settings
from llm_usage.kafka.permissions import (
    KAFKA_NAMESPACE,
    STRIMZI_CLUSTER,
    USERS,
    Operation,
    Resource,
    Worker,
    kafka_user_files,
    main,
    required_acls,
)
from tests.artifacts.deploy import K8S, closed_schema, schema
from tests.tools.kustomize import ensure_kustomize
from tests.unavailable import service_unavailable

USERS_DIR = K8S / "kafka-users"
SCHEMA = "kafka.strimzi.io_kafkauser_v1.json"
REGENERATE = "python -m llm_usage.kafka.permissions --strimzi deploy/k8s/kafka-users"


def defaults() -> Settings:
    return Settings.model_construct()


def test_the_folder_holds_exactly_what_the_table_renders() -> None:
    expected = kafka_user_files(defaults())
    found = {path.name: path.read_text() for path in USERS_DIR.iterdir()}
    assert sorted(found) == sorted(expected), f"run `{REGENERATE}`"
    for name, text in expected.items():
        assert found[name] == text, f"{name} is not what the table renders: run `{REGENERATE}`"


def test_the_generator_writes_those_files(tmp_path: Any) -> None:
    assert main(["--strimzi", str(tmp_path)]) == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == kafka_user_files(defaults())


@cache
def validator() -> jsonschema.protocols.Validator:
    return jsonschema.Draft7Validator(closed_schema(schema(SCHEMA)))


def users() -> list[dict[str, Any]]:
    return [yaml.safe_load((USERS_DIR / f"{USERS[worker]}.yaml").read_text()) for worker in Worker]


@pytest.mark.parametrize("user", users(), ids=[USERS[w] for w in Worker])
def test_each_kafka_user_is_valid_against_strimzis_schema(user: dict[str, Any]) -> None:
    problems = [f"{e.json_path}: {e.message}" for e in validator().iter_errors(user)]
    assert not problems, problems
    assert user["apiVersion"] == "kafka.strimzi.io/v1"
    assert user["kind"] == "KafkaUser"
    assert user["metadata"]["labels"]["strimzi.io/cluster"] == STRIMZI_CLUSTER
    assert user["spec"]["authentication"] == {"type": "scram-sha-512"}


def test_a_misspelt_field_would_be_refused() -> None:
    """The strict schema is not vacuous: it refuses what Strimzi's API server would prune."""
    user = users()[0]
    user["spec"]["authorization"]["acls"][0]["operation"] = "Read"  # v1beta2's, gone in v1
    assert list(validator().iter_errors(user))


def test_each_user_is_granted_exactly_the_table_and_only_literal_names() -> None:
    settings = defaults()
    for worker, user in zip(Worker, users(), strict=True):
        granted = {
            (Resource(acl["resource"]["type"]), acl["resource"]["name"], Operation(op))
            for acl in user["spec"]["authorization"]["acls"]
            for op in acl["operations"]
        }
        assert granted == {
            (acl.resource, acl.name, acl.operation) for acl in required_acls(settings, worker)
        }
        for acl in user["spec"]["authorization"]["acls"]:
            assert acl["resource"]["patternType"] == "literal"
            assert acl.get("type", "allow") == "allow"


def test_the_table_is_the_least_each_worker_needs() -> None:
    """What issue 19 asks for, as the table states it (the broker test proves each one needed)."""
    s = defaults()
    table = {
        w: {(a.resource.value, a.name, a.operation.value) for a in required_acls(s, w)}
        for w in Worker
    }
    usage, dlq, alerts = s.usage_topic, s.dlq_topic, s.alerts_topic
    assert table[Worker.USAGE] == {
        ("topic", usage, "Read"), ("group", s.usage_group_id, "Read"), ("topic", dlq, "Write"),
    }  # fmt: skip
    assert table[Worker.BUDGET] == {
        ("topic", usage, "Read"), ("group", s.budget_group_id, "Read"),
        ("topic", alerts, "Write"), ("topic", alerts, "Read"),
    }  # fmt: skip
    assert table[Worker.API] == {("topic", usage, "Write")}
    assert table[Worker.OPERATOR] == {("topic", dlq, "Read"), ("topic", usage, "Write")}
    assert table[Worker.KEDA] == {
        ("topic", usage, "Describe"),
        ("group", s.usage_group_id, "Describe"),
        ("group", s.budget_group_id, "Describe"),
    }
    # No cluster ACL (IdempotentWrite), no transactional id, nothing for the rollup.
    assert {a.resource for w in Worker for a in required_acls(s, w)} == {
        Resource.TOPIC,
        Resource.GROUP,
    }


def test_the_kustomization_renders_the_five_users() -> None:
    try:
        kustomize = ensure_kustomize()
    except LocalServiceError as error:
        service_unavailable(f"no kustomize: {error}")
    result = subprocess.run(
        [str(kustomize), "build", str(USERS_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(doc["metadata"]["name"] for doc in rendered) == sorted(USERS.values())
    assert {doc["metadata"]["namespace"] for doc in rendered} == {KAFKA_NAMESPACE}
