"""`deploy/compose.yaml`, checked against the Compose Specification's JSON Schema
(`deploy/schemas`), then for what a schema cannot say: start order, commands the CLI accepts,
settings it reads, mounted files, what Prometheus scrapes and Grafana shows.

Every check is also run on a broken copy, to show that it can fail.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from llm_usage.api.server import GRACEFUL_SHUTDOWN_SECONDS
from llm_usage.cli.main import build_parser
from tests.artifacts.deploy import (
    COMPOSE_FILE,
    DEDUP_MARGIN_HOURS,
    DEPLOY,
    DOCKERFILE,
    DRAIN_SECONDS,
    GRACE_MARGIN_SECONDS,
    Object,
    command_problems,
    schema,
    settings_problems,
)

# The checks shared with the Kubernetes manifests (tests/artifacts/deploy.py).


def test_a_command_llm_usage_does_not_know_is_caught() -> None:
    assert command_problems("x", ["rollup", "schedule"], ["rollup", "schedule"]) == []
    assert command_problems("x", ["consume", "usages"], ["consume", "usages"]) != []
    assert command_problems("x", ["consume", "budget"], ["consume", "usage"]) != []


def test_unknown_or_refused_settings_are_caught() -> None:
    assert settings_problems("x", {"KAFKA_BOOTSTRAP_SERVERS": "k:9092"}) == []
    assert settings_problems("x", {"KAFKA_BOOTSTRAP_SERVER": "k:9092"}) == [
        "x: KAFKA_BOOTSTRAP_SERVER is not a setting llm-usage reads"
    ]
    # (SASL without credentials is refused where a Kafka client is built, not by the settings.)
    [refused] = settings_problems("x", {"API_PORT": "70000"})
    assert "API_PORT" in refused


# ---------------------------------------------------------------------------------------------
# compose.yaml.


def compose_schema_errors(document: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema("compose-spec.json"))
    return [
        f"{error.json_path}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=str)
    ]


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_]\w*))"
)


class MissingVariableError(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}, ${VAR:+replacement}, ${VAR+replacement}."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"] or "", match["arg"] or ""
        present = name in env
        usable = present and (env[name] != "" or not op.startswith(":"))
        if op.endswith("-"):
            return env[name] if usable else arg
        if op.endswith("?"):
            if not usable:
                raise MissingVariableError(f"{name}: {arg}")
            return env[name]
        if op.endswith("+"):
            return arg if usable else ""
        return env.get(name, "")

    return _VARIABLE.sub(replace, value)


def test_interpolation_reads_as_compose_does() -> None:
    env = {"A": "1", "EMPTY": ""}

    assert interpolate("$$A ${A} $A ${B:-2} ${EMPTY:-3} ${EMPTY-4} ${A:+5}", env) == "$A 1 1 2 3  5"
    with pytest.raises(MissingVariableError, match="B: set it"):
        interpolate("${B:?set it}", env)


COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "0123456789abcdef",
    "GRAFANA_ADMIN_PASSWORD": "fedcba98",
    "API_JWT_SECRET": "0123456789abcdef" * 4,
}
COMPOSE_WORKERS = {
    "usage-consumer": ["consume", "usage"],
    "budget-consumer": ["consume", "budget"],
    "rollup-schedule": ["rollup", "schedule"],
}
# `serve api`: its service, and the job Prometheus scrapes it as (deploy/prometheus/prometheus.yml).
COMPOSE_API = "api"
# `llm-usage maintain` at start (once migrate succeeded) and then hourly, archiving into a named
# volume (the only copy of a dropped month must outlive the container).
COMPOSE_MAINTAIN = "maintain"
COMPOSE_ONE_SHOTS = {
    "migrate": (["migrate"], "postgres"),
    "topics": (["topics", "ensure", "--partitions", "6", "--replication-factor", "1"], "kafka"),
}


def load_compose() -> Any:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(amount) * units[unit] for amount, unit in parts)


def bind_mounts(service: Object) -> list[tuple[str, str]]:
    """(source relative to deploy/, target) of each bind mount, short or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                mounts.append((source, target))
        elif volume.get("type") == "bind":
            mounts.append((volume["source"], volume["target"]))
    return mounts


def host_path(service: Object, container_path: str) -> Path | None:
    """Where on the host a path inside the container comes from, through its bind mounts."""
    for source, target in bind_mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return (DEPLOY / source / container_path[len(target) :].lstrip("/")).resolve()
    return None


def compose_problems(raw: Any, env: dict[str, str]) -> list[str]:  # noqa: PLR0912
    try:
        compose = interpolate(raw, env)
    except MissingVariableError as error:
        return [f"a variable compose needs is missing: {error}"]
    problems = [f"schema: {error}" for error in compose_schema_errors(compose)]
    services: dict[str, Object] = compose.get("services", {})

    kafka = services.get("kafka", {})
    kafka_env = kafka.get("environment", {})
    if not re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka.get("image", "")):
        problems.append(f"kafka: image {kafka.get('image')} is not apache/kafka 4.x, pinned")
    if "controller" not in kafka_env.get("KAFKA_PROCESS_ROLES", "") or any(
        "ZOOKEEPER" in name for name in kafka_env
    ):
        problems.append("kafka: not KRaft (KAFKA_PROCESS_ROLES broker,controller, no ZooKeeper)")
    if kafka_env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE") != "false":
        problems.append("kafka: topics must not be auto-created")
    if kafka_env.get("KAFKA_LOG_CLEANUP_POLICY", "delete") != "delete":
        problems.append("kafka: the alerts topic would be compacted")
    retention_hours = float(kafka_env.get("KAFKA_LOG_RETENTION_HOURS", 168))

    for name, (args, after) in COMPOSE_ONE_SHOTS.items():
        service = services.get(name, {})
        problems += command_problems(f"compose {name}", service.get("command", []), args)
        if service.get("restart") != "no":
            problems.append(f"compose {name}: a one-shot must not restart")
        condition = service.get("depends_on", {}).get(after, {}).get("condition")
        if condition != "service_healthy":
            problems.append(f"compose {name}: does not wait for {after} to be healthy")
    for name in [*COMPOSE_ONE_SHOTS, *COMPOSE_WORKERS, COMPOSE_API]:
        service = services.get(name, {})
        where = f"compose {name}"
        if service.get("build", {}).get("dockerfile") != "deploy/Dockerfile":
            problems.append(f"{where}: not built from deploy/Dockerfile")
        context = DEPLOY / service.get("build", {}).get("context", ".")
        if (context / "deploy" / "Dockerfile").resolve() != DOCKERFILE:
            problems.append(f"{where}: the build context is not the repository's root")
        variables = {key: str(value) for key, value in service.get("environment", {}).items()}
        problems += settings_problems(where, variables)
        dedup = float(variables.get("DEDUP_WINDOW_HOURS", 192))
        if dedup < retention_hours + DEDUP_MARGIN_HOURS:
            problems.append(
                f"{where}: remembers ids {dedup} h, the topic keeps {retention_hours} h"
            )
    for name, args in COMPOSE_WORKERS.items():
        service = services.get(name, {})
        where = f"compose {name}"
        problems += command_problems(where, service.get("command", []), args)
        for one_shot in COMPOSE_ONE_SHOTS:
            condition = service.get("depends_on", {}).get(one_shot, {}).get("condition")
            if condition != "service_completed_successfully":
                problems.append(f"{where}: starts before {one_shot} has succeeded")
        grace = duration_seconds(service.get("stop_grace_period", "10s"))
        if grace < DRAIN_SECONDS + GRACE_MARGIN_SECONDS:
            problems.append(f"{where}: stop_grace_period {grace} s is shorter than the drain")
        port = service.get("environment", {}).get("METRICS_PORT", "9108")
        if f"127.0.0.1:{port}/readyz" not in json.dumps(service.get("healthcheck", {})):
            problems.append(f"{where}: the healthcheck does not ask /readyz on METRICS_PORT")

    problems += api_problems(services)
    problems += maintain_problems(compose)

    for name, service in services.items():
        for needed in service.get("depends_on", {}):
            if needed not in services:
                problems.append(f"compose {name}: depends on {needed}, which is not a service")
        for port in service.get("ports", []):
            if not str(port).startswith("127.0.0.1:"):
                problems.append(f"compose {name}: port {port} is open beyond this host")
        for source, _ in bind_mounts(service):
            if not (DEPLOY / source).exists():
                problems.append(f"compose {name}: mounts {source}, which does not exist")
        for key, value in service.get("environment", {}).items():
            literal = raw["services"].get(name, {}).get("environment", {}).get(key, "")
            if "PASSWORD" in key and not re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(literal)):
                problems.append(f"compose {name}: {key} is written in compose.yaml ({value})")
    problems += prometheus_problems(services)
    problems += grafana_problems(services)
    return problems


def api_problems(services: dict[str, Object]) -> list[str]:
    """`serve api`: started after the one-shots, published on the host's loopback, checked on
    /readyz of API_PORT, given time to finish the requests in flight."""
    where = f"compose {COMPOSE_API}"
    service = services.get(COMPOSE_API)
    if service is None:
        return [f"{where}: `serve api` is not a service"]
    problems = command_problems(where, service.get("command", []), ["serve", "api"])
    variables = {key: str(value) for key, value in service.get("environment", {}).items()}
    if not variables.get("API_JWT_SECRET") and not variables.get("API_JWT_JWKS_FILE"):
        problems.append(f"{where}: no API_JWT_SECRET or API_JWT_JWKS_FILE: it would not start")
    for one_shot in COMPOSE_ONE_SHOTS:
        condition = service.get("depends_on", {}).get(one_shot, {}).get("condition")
        if condition != "service_completed_successfully":
            problems.append(f"{where}: starts before {one_shot} has succeeded")
    port = variables.get("API_PORT", "8080")
    if f"127.0.0.1:{port}/readyz" not in json.dumps(service.get("healthcheck", {})):
        problems.append(f"{where}: the healthcheck does not ask /readyz on API_PORT")
    if not any(str(published).endswith(f":{port}") for published in service.get("ports", [])):
        problems.append(f"{where}: API_PORT {port} is not published")
    grace = duration_seconds(service.get("stop_grace_period", "10s"))
    if grace < GRACEFUL_SHUTDOWN_SECONDS + GRACE_MARGIN_SECONDS:
        problems.append(f"{where}: stop_grace_period {grace} s cuts the requests in flight short")
    return problems


def maintain_problems(compose: Object) -> list[str]:
    """`maintain`: the image's `llm-usage maintain` in a loop once migrate succeeded, hourly,
    with ARCHIVE_URL on a named volume (or an object store), never inside the container."""
    where = f"compose {COMPOSE_MAINTAIN}"
    service = compose.get("services", {}).get(COMPOSE_MAINTAIN)
    if service is None:
        return [f"{where}: `llm-usage maintain` is not a service"]
    problems = []
    if service.get("build", {}).get("dockerfile") != "deploy/Dockerfile":
        problems.append(f"{where}: not built from deploy/Dockerfile")
    script = "\n".join([*service.get("entrypoint", []), *service.get("command", [])])
    if not re.search(r"^\s*llm-usage maintain\b", script, re.MULTILINE):
        problems.append(f"{where}: does not run `llm-usage maintain`")
    if not re.search(r"\bsleep 3600\b", script) or service.get("restart") == "no":
        problems.append(f"{where}: does not run again every hour")
    try:
        build_parser().parse_args(["maintain"])
    except SystemExit:
        problems.append(f"{where}: `llm-usage maintain` is not a command llm-usage accepts")
    condition = service.get("depends_on", {}).get("migrate", {}).get("condition")
    if condition != "service_completed_successfully":
        problems.append(f"{where}: starts before migrate has succeeded")
    variables = {key: str(value) for key, value in service.get("environment", {}).items()}
    problems += settings_problems(where, variables)
    archive = variables.get("ARCHIVE_URL", "")
    named = {
        volume.split(":")[1]
        for volume in service.get("volumes", [])
        if isinstance(volume, str) and volume.split(":")[0] in (compose.get("volumes") or {})
    }
    on_volume = any(archive == target or archive.startswith(target + "/") for target in named)
    if not (archive.startswith("s3://") or on_volume):
        problems.append(f"{where}: ARCHIVE_URL {archive!r} is not on a named volume")
    return problems


def prometheus_problems(services: dict[str, Object]) -> list[str]:
    prometheus = services.get("prometheus", {})
    config_file = host_path(prometheus, "/etc/prometheus/prometheus.yml")
    if config_file is None or not config_file.is_file():
        return ["compose prometheus: no configuration mounted at /etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_file.read_text())
    problems = []
    rule_files = [
        path
        for pattern in config.get("rule_files", [])
        if (found := host_path(prometheus, str(Path("/etc/prometheus") / pattern))) is not None
        for path in found.parent.glob(found.name)
    ]
    if not rule_files:
        problems.append("compose prometheus: no rule file is mounted where rule_files look")
    jobs = config.get("scrape_configs", [])
    targets = {
        target
        for job in jobs
        for static in job.get("static_configs", [])
        for target in static.get("targets", [])
    } | {
        f"{name}:{dns['port']}"
        for job in jobs
        for dns in job.get("dns_sd_configs", [])
        for name in dns.get("names", [])
    }
    for name in COMPOSE_WORKERS:
        port = services.get(name, {}).get("environment", {}).get("METRICS_PORT", "9108")
        if f"{name}:{port}" not in targets:
            problems.append(f"compose prometheus: does not scrape {name}:{port}")
    # `serve api` serves /metrics on API_PORT, beside its routes.
    port = services.get(COMPOSE_API, {}).get("environment", {}).get("API_PORT", "8080")
    if f"{COMPOSE_API}:{port}" not in targets:
        problems.append(f"compose prometheus: does not scrape {COMPOSE_API}:{port}")
    # The rules aggregate by (namespace, job): every compose target gets the namespace label.
    for job in jobs:
        relabels = job.get("relabel_configs", [])
        if not any(r.get("target_label") == "namespace" for r in relabels):
            problems.append(f"compose prometheus: job {job.get('job_name')} sets no namespace")
    return problems


def grafana_problems(services: dict[str, Object]) -> list[str]:
    grafana = services.get("grafana", {})
    problems = []
    providers_dir = host_path(grafana, "/etc/grafana/provisioning/dashboards")
    datasources_dir = host_path(grafana, "/etc/grafana/provisioning/datasources")
    if providers_dir is None or datasources_dir is None:
        return ["compose grafana: dashboards or data sources are not provisioned"]
    dashboards = [
        path
        for provider_file in providers_dir.glob("*.y*ml")
        for provider in yaml.safe_load(provider_file.read_text()).get("providers", [])
        if (folder := host_path(grafana, provider["options"]["path"])) is not None
        for path in folder.glob("*.json")
    ]
    if not dashboards:
        problems.append("compose grafana: no dashboard JSON where its providers look")
    urls = [
        source.get("url", "")
        for datasource_file in datasources_dir.glob("*.y*ml")
        for source in yaml.safe_load(datasource_file.read_text()).get("datasources", [])
        if source.get("type") == "prometheus"
    ]
    if not any(re.fullmatch(r"http://prometheus:9090/?", url) for url in urls):
        problems.append(f"compose grafana: no data source reaches the prometheus service ({urls})")
    return problems


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    raw = load_compose()

    assert compose_schema_errors(raw) == []
    assert compose_schema_errors(interpolate(raw, COMPOSE_ENV)) == []


def test_compose_runs_the_pipeline_in_order_with_what_each_part_needs() -> None:
    assert compose_problems(load_compose(), COMPOSE_ENV) == []


def test_compose_needs_its_passwords_from_outside() -> None:
    [problem] = compose_problems(load_compose(), {"GRAFANA_ADMIN_PASSWORD": "x"})

    assert "POSTGRES_PASSWORD" in problem


def _compose_unknown_key(c: Any) -> None:
    c["services"]["usage-consumer"]["stop_grace"] = "45s"


def _compose_bad_condition(c: Any) -> None:
    c["services"]["budget-consumer"]["depends_on"]["migrate"]["condition"] = "service_done"


def _compose_no_wait_for_topics(c: Any) -> None:
    done = {"condition": "service_completed_successfully"}
    c["services"]["usage-consumer"]["depends_on"] = {"migrate": done}


def _compose_short_grace(c: Any) -> None:
    c["services"]["budget-consumer"]["stop_grace_period"] = "10s"


def _compose_literal_password(c: Any) -> None:
    c["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] = "postgres"


def _compose_open_port(c: Any) -> None:
    c["services"]["postgres"]["ports"] = ["5432:5432"]


def _compose_zookeeper(c: Any) -> None:
    c["services"]["kafka"]["image"] = "apache/kafka:3.9.1"


def _compose_short_dedup(c: Any) -> None:
    c["services"]["budget-consumer"]["environment"]["DEDUP_WINDOW_HOURS"] = "168"


def _compose_unknown_setting(c: Any) -> None:
    c["services"]["rollup-schedule"]["environment"]["ROLLUP_PREVIEW_MINUTE"] = "5"


def _compose_wrong_command(c: Any) -> None:
    c["services"]["rollup-schedule"]["command"] = ["rollup", "run"]


def _compose_unscraped_worker(c: Any) -> None:
    c["services"]["rollup-schedule"]["environment"]["METRICS_PORT"] = "9200"


def _compose_api_unscraped(c: Any) -> None:
    c["services"]["api"]["environment"]["API_PORT"] = "8081"


def _compose_api_short_grace(c: Any) -> None:
    c["services"]["api"]["stop_grace_period"] = "5s"


def _compose_api_without_key(c: Any) -> None:
    del c["services"]["api"]["environment"]["API_JWT_SECRET"]


def _compose_api_first(c: Any) -> None:
    del c["services"]["api"]["depends_on"]["migrate"]


def _compose_maintain_in_container(c: Any) -> None:
    c["services"]["maintain"]["environment"]["ARCHIVE_URL"] = "/tmp/archive"  # noqa: S108


def _compose_maintain_default_archive(c: Any) -> None:
    del c["services"]["maintain"]["environment"]["ARCHIVE_URL"]


def _compose_maintain_once(c: Any) -> None:
    c["services"]["maintain"]["command"] = ["llm-usage maintain"]


def _compose_maintain_first(c: Any) -> None:
    del c["services"]["maintain"]["depends_on"]["migrate"]


def _compose_maintain_volume_undeclared(c: Any) -> None:
    del c["volumes"]["archive-data"]


def _compose_missing_mount(c: Any) -> None:
    c["services"]["grafana"]["volumes"][2]["source"] = "./grafana/missing"


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (_compose_unknown_key, "schema: $.services['usage-consumer']"),
        (_compose_bad_condition, "schema: $.services['budget-consumer'].depends_on"),
        (_compose_no_wait_for_topics, "usage-consumer: starts before topics"),
        (_compose_short_grace, "budget-consumer: stop_grace_period"),
        (_compose_literal_password, "postgres: POSTGRES_PASSWORD is written"),
        (_compose_open_port, "postgres: port 5432:5432"),
        (_compose_zookeeper, "kafka: image apache/kafka:3.9.1"),
        (_compose_short_dedup, "budget-consumer: remembers ids 168.0 h"),
        (_compose_unknown_setting, "ROLLUP_PREVIEW_MINUTE is not a setting"),
        (_compose_wrong_command, "rollup-schedule: runs `llm-usage rollup run`"),
        (_compose_unscraped_worker, "does not scrape rollup-schedule:9200"),
        (_compose_missing_mount, "mounts ./grafana/missing"),
        (_compose_api_unscraped, "does not scrape api:8081"),
        (_compose_api_unscraped, "api: the healthcheck does not ask /readyz on API_PORT"),
        (_compose_api_short_grace, "api: stop_grace_period 5.0 s"),
        (_compose_api_without_key, "api: no API_JWT_SECRET"),
        (_compose_api_first, "api: starts before migrate"),
        (_compose_maintain_in_container, "maintain: ARCHIVE_URL '/tmp/archive' is not on a named"),
        (_compose_maintain_default_archive, "maintain: ARCHIVE_URL '' is not on a named volume"),
        (_compose_maintain_once, "maintain: does not run again every hour"),
        (_compose_maintain_first, "maintain: starts before migrate has succeeded"),
        (
            _compose_maintain_volume_undeclared,
            "maintain: ARCHIVE_URL '/var/lib/llm-usage/archive' is not",
        ),
    ],
)
def test_a_broken_compose_file_is_caught(break_it: Callable[[Any], None], expected: str) -> None:
    broken = load_compose()
    break_it(broken)

    problems = compose_problems(broken, COMPOSE_ENV)

    assert any(expected in problem for problem in problems), problems
