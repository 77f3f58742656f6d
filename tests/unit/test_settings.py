"""Configuration: contract defaults, and one clear line for a bad value."""

from __future__ import annotations

import re

import pytest

from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import load_settings
from llm_usage.kafka.clients import client_options


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "USAGE_TOPIC", "DLQ_TOPIC"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.kafka_bootstrap_servers == "localhost:9092"
    assert settings.database_url == "postgresql://localhost/llm_usage"
    assert settings.usage_topic == "llm_usage_recorded"
    assert settings.dlq_topic == "llm_usage_recorded.dlq"
    assert settings.alerts_topic == "llm_budget_alerts"
    assert settings.usage_group_id == "llm-usage-ingest"
    assert client_options(settings) == {
        "bootstrap_servers": "localhost:9092",
        "security_protocol": "PLAINTEXT",
    }


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USAGE_TOPIC", "usage.v1")
    monkeypatch.setenv("METRICS_PORT", "9999")
    monkeypatch.setenv("LOG_FORMAT", "console")
    settings = load_settings()
    assert (settings.usage_topic, settings.metrics_port, settings.log_format) == (
        "usage.v1",
        9999,
        "console",
    )


def test_sasl_settings_reach_the_kafka_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "secret")
    options = client_options(load_settings())
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "svc"
    assert options["sasl_plain_password"] == "secret"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("METRICS_PORT", "not-a-port"),
        ("METRICS_PORT", "70000"),
        ("LOG_FORMAT", "xml"),
        ("KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("CONSUMER_MAX_BATCH", "0"),
    ],
)
def test_bad_value_names_the_variable_in_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    message = str(raised.value)
    assert variable in message
    assert value in message
    assert "\n" not in message


def test_sasl_without_a_password_is_one_line_naming_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    monkeypatch.delenv("KAFKA_SASL_PASSWORD", raising=False)
    settings = load_settings()  # a worker without a Kafka client (the rollup) needs none
    with pytest.raises(ConfigurationError, match="KAFKA_SASL_PASSWORD are required") as raised:
        client_options(settings)
    assert "\n" not in str(raised.value)


def test_a_sasl_protocol_without_a_mechanism_is_refused_where_a_kafka_client_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.delenv("KAFKA_SASL_MECHANISM", raising=False)
    settings = load_settings()
    assert settings.kafka_sasl_mechanism is None
    with pytest.raises(
        ConfigurationError, match="KAFKA_SASL_MECHANISM is required with KAFKA_SECURITY_PROTOCOL"
    ) as raised:
        client_options(settings)
    assert "\n" not in str(raised.value)


def test_an_unreadable_ca_file_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", "/nonexistent/ca.pem")
    settings = load_settings()
    with pytest.raises(
        ConfigurationError, match=re.escape("KAFKA_SSL_CAFILE='/nonexistent/ca.pem'")
    ):
        client_options(settings)


@pytest.mark.parametrize("mechanism", ["GSSAPI", "OAUTHBEARER"])
def test_sasl_mechanisms_that_cannot_work_here_are_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, mechanism: str
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", mechanism)
    with pytest.raises(ConfigurationError, match="KAFKA_SASL_MECHANISM") as raised:
        load_settings()
    assert "\n" not in str(raised.value)


def test_the_sasl_password_never_shows_in_a_repr_or_a_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2-secret")
    settings = load_settings()
    assert "hunter2-secret" not in repr(settings)
    assert "hunter2-secret" not in str(settings.model_dump())
    assert client_options(settings)["sasl_plain_password"] == "hunter2-secret"


def test_the_budget_batch_is_four_consumer_batches_unless_set() -> None:
    assert load_settings(consumer_max_batch=100).budget_batch() == 400
    assert load_settings(consumer_max_batch=50_000).budget_batch() == 100_000
    assert load_settings(consumer_max_batch=100, budget_max_batch=7).budget_batch() == 7
