"""Static group membership and the session: what the settings give the consumers."""

from __future__ import annotations

import pytest

from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import load_settings
from llm_usage.kafka.clients import membership_options, new_consumer


def test_without_an_instance_id_members_are_dynamic_with_a_short_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in ("KAFKA_GROUP_INSTANCE_ID", "KAFKA_SESSION_TIMEOUT_MS"):
        monkeypatch.delenv(variable, raising=False)
    options = membership_options(load_settings())
    assert options == {
        "group_instance_id": None,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 3_000,
    }


async def test_an_instance_id_makes_a_static_member_whose_session_outlasts_a_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_GROUP_INSTANCE_ID", "llm-usage-budget-1")
    monkeypatch.delenv("KAFKA_SESSION_TIMEOUT_MS", raising=False)
    settings = load_settings()
    assert membership_options(settings)["group_instance_id"] == "llm-usage-budget-1"
    assert membership_options(settings)["session_timeout_ms"] == 45_000
    consumer = new_consumer(settings, group_id="g", max_batch=10)
    assert consumer._group_instance_id == "llm-usage-budget-1"
    assert consumer._session_timeout_ms == 45_000
    await consumer.stop()


def test_a_session_set_by_hand_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_GROUP_INSTANCE_ID", "a")
    monkeypatch.setenv("KAFKA_SESSION_TIMEOUT_MS", "12000")
    monkeypatch.setenv("KAFKA_HEARTBEAT_INTERVAL_MS", "1000")
    options = membership_options(load_settings())
    assert (options["session_timeout_ms"], options["heartbeat_interval_ms"]) == (12_000, 1_000)


def test_a_heartbeat_too_slow_for_the_session_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_SESSION_TIMEOUT_MS", "9000")
    monkeypatch.setenv("KAFKA_HEARTBEAT_INTERVAL_MS", "4000")
    with pytest.raises(ConfigurationError, match="KAFKA_HEARTBEAT_INTERVAL_MS=4000") as raised:
        membership_options(load_settings())
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("value", ["pod name", "a/b", "x" * 250])
def test_an_instance_id_kafka_would_refuse_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("KAFKA_GROUP_INSTANCE_ID", value)
    with pytest.raises(ConfigurationError, match=r"^KAFKA_GROUP_INSTANCE_ID: "):
        load_settings()


def test_a_session_below_the_brokers_minimum_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_SESSION_TIMEOUT_MS", "3000")
    with pytest.raises(ConfigurationError, match=r"^KAFKA_SESSION_TIMEOUT_MS: "):
        load_settings()
