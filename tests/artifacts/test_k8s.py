"""`deploy/k8s`: every overlay rendered by kustomize (built from its pinned Go module into the
project's cache, `tests.tools.kustomize`), every object validated against its schema
(kubernetes-validate for the core kinds, the CRDs' own schemas for KEDA and Strimzi), then the
promises: probes, drain time, resources, PDBs, scaling on lag up to the partitions, topics,
secrets only from Secrets.

Every check is also run on a broken copy, to show that it can fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from llm_usage.core.errors import LocalServiceError
from tests.artifacts.deploy import (
    DEDUP_MARGIN_HOURS,
    DRAIN_SECONDS,
    GRACE_MARGIN_SECONDS,
    K8S,
    MIN_USAGE_RETENTION_HOURS,
    SECRET_VARIABLES,
    Object,
    command_problems,
    schema,
    setting_default,
    settings_problems,
    settings_variables,
)
from tests.tools.kustomize import BUILD_TIMEOUT_SECONDS, ensure_kustomize
from tests.unavailable import service_unavailable

# The first test that asks for kustomize may build it (2-4 minutes, modules downloaded first).
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 300)


@pytest.fixture(scope="session")
def kustomize() -> Path:
    """The pinned kustomize, built once per machine."""
    try:
        return ensure_kustomize(progress=True)
    except LocalServiceError as error:
        service_unavailable(f"no kustomize: {error}")


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
