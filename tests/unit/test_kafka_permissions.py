"""The ACL table, its one line for a person, and the two requests the start-up check sends
(tests/integration/test_kafka_acls.py runs them against a broker that enforces ACLs)."""

from __future__ import annotations

import io
import secrets
from pathlib import Path
from typing import Any

import pytest
from aiokafka.protocol.types import Int32

from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import Settings
from llm_usage.kafka.authorization import (
    _GroupOperationsRequest,
    _reported,
    _TopicOperationsRequest,
    refusal_line,
)
from llm_usage.kafka.permissions import (
    USERS,
    Acl,
    Operation,
    Resource,
    Worker,
    kafka_user_manifest,
    main,
    markdown_table,
    required_acls,
)
from llm_usage.local.kafka import SaslSslListener

OTHER_NAMES: dict[str, Any] = {
    "usage_topic": "u.t",
    "dlq_topic": "u.t.dlq",
    "alerts_topic": "a.t",
    "usage_group_id": "g.usage",
    "budget_group_id": "g.budget",
}


def test_the_table_follows_the_settings_names() -> None:
    settings = Settings.model_construct(**OTHER_NAMES)
    named = {acl.name for worker in Worker for acl in required_acls(settings, worker)}
    assert named == set(OTHER_NAMES.values())


def test_every_worker_that_talks_to_kafka_has_a_user_and_the_rollup_none() -> None:
    assert set(USERS) == set(Worker)
    assert "rollup" not in {w.value for w in Worker}
    assert len(set(USERS.values())) == len(USERS)


def test_no_acl_is_listed_twice_and_describe_only_where_nothing_implies_it() -> None:
    settings = Settings.model_construct()
    for worker in Worker:
        acls = required_acls(settings, worker)
        assert len(set(acls)) == len(acls), worker
        strong = {(a.resource, a.name) for a in acls if a.operation is not Operation.DESCRIBE}
        for acl in acls:
            if acl.operation is Operation.DESCRIBE:
                # Kafka grants Describe with Read or Write: listing it too would be an ACL
                # whose removal changes nothing.
                assert (acl.resource, acl.name) not in strong, acl


def test_kafkas_wire_codes() -> None:
    """AclOperation and ResourceType as Kafka numbers them (org.apache.kafka.common.acl)."""
    acl = Acl(Resource.TOPIC, "t", Operation.READ)
    assert (acl.resource_code, acl.operation_code) == (2, 3)
    assert Acl(Resource.GROUP, "g", Operation.WRITE).operation_code == 4
    assert Acl(Resource.GROUP, "g", Operation.DESCRIBE).resource_code == 3
    assert Acl(Resource.GROUP, "g", Operation.DESCRIBE).operation_code == 8


def test_the_one_line_names_each_denied_operation_the_user_and_where_to_read() -> None:
    settings = Settings.model_construct(kafka_sasl_username="llm-usage-ingest")
    denied = [Acl(Resource.TOPIC, "llm_usage_recorded.dlq", Operation.WRITE)]
    line = refusal_line(settings, denied, worker=Worker.USAGE)
    assert line is not None
    assert line.startswith(
        "Kafka denies Write on topic llm_usage_recorded.dlq to user llm-usage-ingest, "
    )
    assert "docs/operations.md" in line
    assert "\n" not in line
    assert refusal_line(settings, [], worker=Worker.USAGE) is None


def test_two_operations_on_one_resource_are_named_together() -> None:
    settings = Settings.model_construct()
    denied = [
        Acl(Resource.TOPIC, "alerts", Operation.WRITE),
        Acl(Resource.TOPIC, "alerts", Operation.READ),
        Acl(Resource.GROUP, "g", Operation.READ),
    ]
    line = refusal_line(settings, denied, worker=Worker.BUDGET)
    assert line is not None
    assert "Kafka denies Write and Read on topic alerts; Read on group g to user ANONYMOUS" in line


def test_metadata_v8_asks_for_the_topics_authorized_operations_only() -> None:
    built = _TopicOperationsRequest(["a", "b"]).prepare({3: (0, 12)})
    assert (built.API_KEY, built.API_VERSION) == (3, 8)
    # topics, allow_auto_topic_creation, include_cluster_…, include_topic_authorized_operations
    assert built.to_object() == {
        "topics": ["a", "b"],
        "allow_auto_topic_creation": False,
        "include_cluster_authorized_operations": False,
        "include_topic_authorized_operations": True,
    }
    assert built.encode()  # the schema encodes


def test_a_broker_without_metadata_v8_is_not_asked() -> None:
    with pytest.raises(NotImplementedError):
        _TopicOperationsRequest(["a"]).prepare({3: (0, 7)})


def test_describe_groups_v3_is_parsed_with_its_authorized_operations() -> None:
    built = _GroupOperationsRequest("g").prepare({15: (0, 5)})
    assert built.API_VERSION == 3
    assert built.to_object() == {"groups": ["g"], "include_authorized_operations": True}
    response_type = built.RESPONSE_TYPE
    # throttle, [error, group, state, protocol_type, protocol, [members], authorized_operations]
    group: tuple[object, ...] = (0, "g", "Empty", "consumer", "", [], (1 << 3) | (1 << 8))
    encoded = response_type(0, [group]).encode()
    decoded = response_type.decode(io.BytesIO(encoded))
    assert decoded.groups[0][-1] == (1 << 3) | (1 << 8)
    assert Int32.decode(io.BytesIO(encoded[-4:])) == (1 << 3) | (1 << 8)


def test_names_that_yaml_would_misread_are_refused() -> None:
    settings = Settings.model_construct(usage_topic="usage: topic")
    with pytest.raises(ConfigurationError, match="cannot be written"):
        kafka_user_manifest(settings, Worker.API)


def test_the_table_for_operators(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--table"]) == 0
    printed = capsys.readouterr().out
    assert printed == markdown_table(Settings.model_construct())
    assert (
        "| `llm-usage-keda` | KEDA's Kafka scaler (lag) | topic `llm_usage_recorded` |" in printed
    )


def test_a_broker_that_does_not_say_is_not_second_guessed() -> None:
    # INT32_MIN: "not requested" (or not computed); every other value is the bit field.
    assert _reported(-(2**31)) & (1 << 4)
    assert _reported(1 << 3) == 1 << 3
    assert not _reported(1 << 3) & (1 << 4)


KEYSTORE_PASSWORD = secrets.token_hex(8)


def test_the_test_broker_enforces_acls_only_when_asked(tmp_path: Path) -> None:
    plain = SaslSslListener(
        keystore=tmp_path / "k.p12", keystore_password=KEYSTORE_PASSWORD, scram_users={"u": "p"}
    )
    assert "authorizer.class.name" not in plain.properties()
    enforcing = SaslSslListener(
        keystore=tmp_path / "k.p12",
        keystore_password=KEYSTORE_PASSWORD,
        scram_users={"u": "p", "admin": "q"},
        authorizer=True,
        super_users=("admin",),
    ).properties()
    assert enforcing["authorizer.class.name"] == (
        "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    )
    # The broker and controller talk as ANONYMOUS over PLAINTEXT: without it nothing starts.
    assert enforcing["super.users"] == "User:ANONYMOUS;User:admin"
    assert enforcing["allow.everyone.if.no.acl.found"] == "false"
    with pytest.raises(ValueError, match="super users"):
        SaslSslListener(
            keystore=tmp_path / "k.p12",
            keystore_password=KEYSTORE_PASSWORD,
            scram_users={"u": "p"},
            super_users=("u",),
        )
