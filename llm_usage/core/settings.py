"""Configuration, read once from the environment (names and defaults from the contract)."""

from __future__ import annotations

import sys
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from llm_usage.core.errors import ConfigurationError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
# GSSAPI (needs the gssapi package and a Kerberos set-up) and OAUTHBEARER (needs a token provider
# object, which an environment variable cannot carry) are not offered: they could not work here.
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def _default_log_format() -> Literal["json", "console"]:
    return "console" if sys.stderr.isatty() else "json"


class Settings(BaseSettings):
    """Everything a worker needs to reach Kafka and PostgreSQL, plus tuning knobs."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    kafka_bootstrap_servers: str = "localhost:9092"
    database_url: str = "postgresql://localhost/llm_usage"

    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None

    usage_topic: str = Field(default="llm_usage_recorded", min_length=1)
    alerts_topic: str = Field(default="llm_budget_alerts", min_length=1)
    dlq_topic: str = Field(default="llm_usage_recorded.dlq", min_length=1)

    usage_group_id: str = Field(default="llm-usage-ingest", min_length=1)
    budget_group_id: str = Field(default="llm-usage-budget", min_length=1)
    # Static group membership (KIP-345): a stable id per replica (a StatefulSet pod's name) lets
    # a restarted replica take its partitions back without a rebalance. Empty: dynamic members.
    kafka_group_instance_id: str = Field(default="", pattern=r"^[A-Za-z0-9._-]{0,249}$")
    # How long the group waits for a silent member before moving its partitions. Unset: 45 s with
    # an instance id (a restarted pod is back well before), 10 s without (aiokafka's default).
    kafka_session_timeout_ms: int | None = Field(default=None, ge=6_000, le=1_800_000)
    kafka_heartbeat_interval_ms: int = Field(default=3_000, ge=100, le=600_000)

    # The id window (Tier 2 of an event's identity): any copy of an id seen this long ago is a
    # duplicate or a conflict whatever its tenant or time; the usage topic's retention (7 days
    # by default) plus a day's margin, since nothing older can be redelivered.
    dedup_window_hours: int = Field(default=192, ge=1)
    # Months of events kept queryable besides the current one; older months are archived and
    # dropped by `llm-usage maintain`, and an event of such a month is dead-lettered `expired`.
    retention_months: int = Field(default=25, ge=1, le=1200)
    # How often every policy is checked against the current day's and month's spend (a policy
    # change is noticed at once through LISTEN/NOTIFY; this is the safety net).
    budget_policy_sweep_seconds: float = Field(default=30.0, gt=0)
    # A budget check's hold lasts this long unless the event with its gateway_request_id is
    # counted first; the budget consumer's sweeper ends expired holds this often.
    budget_hold_seconds: int = Field(default=300, ge=1, le=86_400)
    budget_hold_sweep_seconds: float = Field(default=5.0, gt=0)

    # Corrections (llm_usage_corrected): how long one waits for its event before it is
    # dead-lettered `unknown_event`, and how often waiting corrections are tried again.
    correction_wait_seconds: float = Field(default=900.0, gt=0)
    correction_retry_seconds: float = Field(default=2.0, gt=0)
    # How often the rollup leader reconciles the current and previous month; 0 never. A run
    # compares in the database and holds only drifts: 10M events took ~73 s of database time
    # and under 80 MiB in the process (BENCHMARKS.md, "Reconcile").
    reconcile_interval_minutes: float = Field(default=60.0, ge=0)

    # The rollup schedule: how often the current month's preview lines are refreshed, and how
    # long after a month ends it is run for the last time and closed.
    rollup_preview_minutes: float = Field(default=15.0, gt=0)
    rollup_close_grace_hours: float = Field(default=48.0, ge=0)

    metrics_port: int = Field(default=9108, ge=0, le=65535)

    # Where archived months go (llm_usage/archive): empty, a local data directory; a directory or
    # file:// URL; or s3://bucket/prefix, with an endpoint for a store other than AWS and its
    # keys (unset keys: the AWS default chain).
    archive_url: str = ""
    archive_s3_endpoint_url: str | None = None
    archive_s3_region: str = Field(default="us-east-1", min_length=1)
    archive_s3_access_key_id: SecretStr | None = None
    archive_s3_secret_access_key: SecretStr | None = None

    # `llm-usage serve api`. Exactly one key source: a shared secret (HS256, development) or a
    # JWKS file of public keys (RS256/ES256); checked when the API starts, not by the workers.
    api_host: str = Field(default="0.0.0.0", min_length=1)  # noqa: S104 - a service's default
    api_port: int = Field(default=8080, ge=0, le=65535)
    # Several `serve api` processes on one host share API_PORT (SO_REUSEPORT; the kernel spreads
    # connections): one process per core without a process manager.
    api_reuse_port: bool = False
    # How long an idle client connection stays open: longer than the idle timeouts of the
    # clients and proxies in front (Go's pool 90 s, ingress-nginx and an AWS ALB 60 s, httpx 5 s).
    # The client must be the side that closes, or a request it sends on a connection the server
    # is closing fails (uvicorn's own 5 s raced httpx's 5 s in CI).
    api_keep_alive_seconds: int = Field(default=120, ge=1, le=3600)
    api_jwt_secret: SecretStr | None = None
    api_jwt_jwks_file: str | None = None
    api_jwt_audience: str = Field(default="llm-usage-pipeline", min_length=1)

    log_format: Literal["json", "console"] = Field(default_factory=_default_log_format)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Tuning. Defaults suit a few thousand events a second per replica.
    consumer_max_batch: int = Field(default=5000, ge=1, le=100_000)
    # The budget consumer's batch; unset, four times CONSUMER_MAX_BATCH. Its counters add up
    # within a batch, so a larger one upserts fewer counter rows an event.
    budget_max_batch: int | None = Field(default=None, ge=1, le=100_000)
    consumer_poll_timeout_ms: int = Field(default=500, ge=10)
    # Retries of one batch stop well before max_poll_interval_ms (300 s) so the member is never
    # evicted; the batch is then fetched again from its first offset.
    batch_retry_seconds: float = Field(default=60.0, gt=0, le=240)
    # How long a rebalance waits for the batch in flight; below the 60 s rebalance timeout.
    consumer_revoke_wait_seconds: float = Field(default=20.0, gt=0, le=50)
    # PostgreSQL connections: the pool of `consume usage` and `serve api`, and the budget
    # consumer's (it also holds a LISTEN and a lock connection). Sized so that every worker at
    # the prod replica maxima fits under max_connections=100 (docs/operations.md).
    database_pool_size: int = Field(default=2, ge=1, le=100)
    budget_database_pool_size: int = Field(default=2, ge=1, le=100)
    # After SIGTERM a worker lands or abandons its batch, commits, stops its side tasks and
    # clients and closes its pool within this many seconds in all (the pods' grace is 45 s).
    shutdown_timeout_seconds: float = Field(default=25.0, gt=0, le=300)

    def session_timeout_ms(self) -> int:
        """KAFKA_SESSION_TIMEOUT_MS, or 45 s for a static member and 10 s for a dynamic one."""
        if self.kafka_session_timeout_ms is not None:
            return self.kafka_session_timeout_ms
        return 45_000 if self.kafka_group_instance_id else 10_000

    def budget_batch(self) -> int:
        """The budget consumer's batch size: BUDGET_MAX_BATCH, or 4 x CONSUMER_MAX_BATCH."""
        if self.budget_max_batch is not None:
            return self.budget_max_batch
        return min(4 * self.consumer_max_batch, 100_000)


def load_settings(**overrides: Any) -> Settings:
    """Read the environment once; a bad value ends in one line naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        first = error.errors()[0]
        variable = "_".join(str(part) for part in first["loc"]).upper()
        if not variable:  # a rule between variables; its message names them
            raise ConfigurationError(
                f"{first['msg'].removeprefix('Value error, ')}; fix the environment and try again"
            ) from None
        raise ConfigurationError(
            f"{variable}: {first['msg']} (got {first.get('input')!r}); "
            f"fix the environment variable {variable} and try again"
        ) from None
