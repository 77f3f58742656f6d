"""`deploy/k8s`: every overlay rendered by kustomize (built from its pinned Go module into the
project's cache, `tests.tools.kustomize`) with the topics of its environment
(`deploy/k8s/kafka-topics`), every object validated against its schema (kubernetes-validate for
the core kinds, the CRDs' own schemas for KEDA and Strimzi), then the promises: probes, drain
time, resources, PDBs that never block a drain, scaling on lag up to the partitions, static
membership, cluster-qualified Kafka addresses, a Kafka user per client, NetworkPolicies, topics
kept out of the overlays, secrets only from Secrets, a migrate Job that starts on a new
namespace, an hourly maintain CronJob whose archive never lands on the pod, and the database
connections at the replica maxima.

Every check is also run on a broken copy, to show that it can fail.
"""

from __future__ import annotations

import copy
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

from llm_usage.api.server import GRACEFUL_SHUTDOWN_SECONDS
from llm_usage.core.errors import LocalServiceError
from tests.artifacts.deploy import (
    DEDUP_MARGIN_HOURS,
    DRAIN_SECONDS,
    GRACE_MARGIN_SECONDS,
    K8S,
    MIN_USAGE_RETENTION_HOURS,
    ROOT,
    SECRET_VARIABLES,
    Object,
    closed_schema,
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
# Each overlay's topics, applied apart (in the Kafka cluster's namespace) so that deleting an
# overlay never deletes a topic.
TOPICS = K8S / "kafka-topics"
# Topic replicas and min.insync.replicas per overlay: dev's topics need not survive a broker.
REPLICATION = {"dev": (1, 1), "prod": (3, 2)}


@pytest.fixture(scope="session")
def overlays(kustomize: Path) -> dict[str, list[Object]]:
    """What `kubectl apply -k deploy/k8s/overlays/<overlay>` applies."""
    return {overlay: render(kustomize, K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def topics(kustomize: Path) -> dict[str, list[Object]]:
    """What `kubectl apply -k deploy/k8s/kafka-topics/<overlay>` applies."""
    return {overlay: render(kustomize, TOPICS / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def rendered(
    overlays: dict[str, list[Object]], topics: dict[str, list[Object]]
) -> dict[str, list[Object]]:
    """An environment: its overlay and its topics."""
    return {overlay: overlays[overlay] + topics[overlay] for overlay in OVERLAYS}


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
    return jsonschema.Draft7Validator(closed_schema(loaded))


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
    assert {
        "Deployment",
        "StatefulSet",
        "Service",
        "Job",
        "CronJob",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ScaledObject",
        "KafkaTopic",
    } <= kinds


def _k8s_misspelt_probe_field(objects: list[Object]) -> None:
    worker(objects, "llm-usage-consume-usage")["livenessProbe"]["httpGet"]["pathh"] = "/healthz"


def _k8s_no_selector(objects: list[Object]) -> None:
    del find(objects, "StatefulSet", "llm-usage-consume-budget")["spec"]["selector"]


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
        (_k8s_misspelt_probe_field, "StatefulSet/llm-usage-consume-usage (Kubernetes 1.30.0)"),
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

# The long-running workers: their kind, their command, and the setting naming the port that
# serves their probes and /metrics (the API serves them on its own port).
WORKERS = {
    "llm-usage-consume-usage": ("StatefulSet", ["consume", "usage"], "METRICS_PORT"),
    "llm-usage-consume-budget": ("StatefulSet", ["consume", "budget"], "METRICS_PORT"),
    "llm-usage-rollup-schedule": ("Deployment", ["rollup", "schedule"], "METRICS_PORT"),
    "llm-usage-api": ("Deployment", ["serve", "api"], "API_PORT"),
}
# The consumers KEDA scales, and the setting that names each one's group.
SCALED = {
    "llm-usage-consume-usage": "USAGE_GROUP_ID",
    "llm-usage-consume-budget": "BUDGET_GROUP_ID",
}
API = "llm-usage-api"
# The workers that talk to Kafka, each as its own KafkaUser (deploy/k8s/kafka-users). Strimzi's
# User Operator writes a user's password into a Secret named like the user, key `password`.
KAFKA_USERS = {
    "llm-usage-consume-usage": "llm-usage-ingest",
    "llm-usage-consume-budget": "llm-usage-budget",
    API: "llm-usage-api",
}
KEDA_USER = "llm-usage-keda"
KAFKA_CA_SECRET = "llm-usage-kafka-ca"
CONFIG_MAP = "llm-usage-config"
WORKER_SECRET = "llm-usage-secrets"
MIGRATE_JOB = "llm-usage-migrate"
MIGRATE_SECRET = "llm-usage-migrate"
MIGRATE_LABEL = ("app.kubernetes.io/component", "migrate")
# `llm-usage maintain`, hourly, as the schema owner (MIGRATE_SECRET); its archive's settings
# from a Secret of its own that whoever deploys makes (ARCHIVE_URL required: never the pod's disk).
MAINTAIN_CRONJOB = "llm-usage-maintain"
ARCHIVE_SECRET = "llm-usage-archive"
# What the manifests name and do not hold, made beforehand by whoever deploys
# (docs/operations.md, "Kubernetes"); `default` is every namespace's own ServiceAccount.
MADE_OUTSIDE = {
    ("ServiceAccount", "default"),
    ("Secret", WORKER_SECRET),
    ("Secret", MIGRATE_SECRET),
    ("Secret", ARCHIVE_SECRET),
    ("ConfigMap", "llm-usage-api-jwks"),
    ("Secret", KAFKA_CA_SECRET),
    ("Secret", KEDA_USER),
    *(("Secret", user) for user in KAFKA_USERS.values()),
}
# Of those, what the first release makes before it applies the migrate Job alone.
MADE_BEFORE_THE_JOB = {("ServiceAccount", "default"), ("Secret", MIGRATE_SECRET)}
# Variables that only a Secret may give (the user name is not a secret: the KafkaUser's name).
SECRET_ONLY = (
    "DATABASE_URL",
    "KAFKA_SASL_PASSWORD",
    "MIGRATE_DATABASE_URL",
    "ARCHIVE_S3_SECRET_ACCESS_KEY",
)
# Prometheus runs in this namespace (deploy/prometheus/prometheus-kubernetes.yml's cluster).
PROMETHEUS_NAMESPACE = "monitoring"
# The API's drain: a preStop sleep of 5-10 s while the endpoints forget the pod, then uvicorn's.
PRE_STOP_SECONDS = (5, 10)
# KEDA's kafka scaler names the SASL mechanisms KAFKA_SASL_MECHANISM offers its own way.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "CronJob")
# The workloads that run a command to its end as the schema owner: no probes, no zone spread.
ONE_SHOT_KINDS = ("Job", "CronJob")


def find(objects: list[Object], kind: str, name: str) -> Object:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name}"
    return found[0]


def find_all(objects: list[Object], kind: str) -> list[Object]:
    return [obj for obj in objects if obj.get("kind") == kind]


def workload(objects: list[Object], name: str) -> Object:
    return find(objects, WORKERS[name][0], name)


def worker(objects: list[Object], name: str) -> Object:
    container: Object = pod_spec(workload(objects, name))["containers"][0]
    return container


def config_map(objects: list[Object]) -> Object:
    """The settings' ConfigMap (generated: its name ends with a hash)."""
    maps = [
        m
        for m in find_all(objects, "ConfigMap")
        if m["metadata"]["name"] == CONFIG_MAP or m["metadata"]["name"].startswith(CONFIG_MAP + "-")
    ]
    assert len(maps) == 1, [name_of(m) for m in maps]
    return maps[0]


def config(objects: list[Object]) -> dict[str, str]:
    """The settings every worker reads (the one ConfigMap), defaults filled in."""
    data: dict[str, str] = config_map(objects).get("data", {})
    defaults = {name: setting_default(name) for name in settings_variables()}
    return {**defaults, **data}


def workloads(objects: list[Object]) -> list[Object]:
    return [obj for obj in objects if obj.get("kind") in WORKLOAD_KINDS]


def pod_spec(obj: Object) -> Object:
    """A workload's pod spec (a CronJob's through its Job template)."""
    workload_spec = obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]
    spec: Object = workload_spec["template"]["spec"]
    return spec


def env_of(container: Object) -> dict[str, Object]:
    return {entry["name"]: entry for entry in container.get("env", [])}


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


def secret_ref(container: Object, variable: str) -> tuple[str, str] | None:
    """The Secret and key an environment variable comes from, if it comes from one."""
    ref = env_of(container).get(variable, {}).get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def container_port(container: Object, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    return None


def references(obj: Object) -> set[tuple[str, str]]:
    """Every ServiceAccount, Secret and ConfigMap a workload's pods need to start."""
    spec = pod_spec(obj)
    found = {("ServiceAccount", spec.get("serviceAccountName", "default"))}
    for container in spec.get("initContainers", []) + spec["containers"]:
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                found.add(("Secret", source["secretRef"]["name"]))
            if "configMapRef" in source:
                found.add(("ConfigMap", source["configMapRef"]["name"]))
        for entry in container.get("env", []):
            value_from = entry.get("valueFrom", {})
            if "secretKeyRef" in value_from:
                found.add(("Secret", value_from["secretKeyRef"]["name"]))
            if "configMapKeyRef" in value_from:
                found.add(("ConfigMap", value_from["configMapKeyRef"]["name"]))
    return found | {ref for volume in spec.get("volumes", []) for ref in volume_references(volume)}


def volume_references(volume: Object) -> set[tuple[str, str]]:
    sources = [volume, *volume.get("projected", {}).get("sources", [])]
    found = set()
    for source in sources:
        if "secret" in source:
            found.add(("Secret", source["secret"].get("secretName") or source["secret"]["name"]))
        if "configMap" in source:
            found.add(("ConfigMap", source["configMap"]["name"]))
    return found


def keys_of(objects: list[Object]) -> set[tuple[str, str]]:
    return {(obj["kind"], obj["metadata"]["name"]) for obj in objects}


def workload_problems(objects: list[Object]) -> list[str]:
    problems = []
    settings = config(objects)
    images = {c["image"] for obj in workloads(objects) for c in pod_spec(obj)["containers"]}
    if len(images) != 1:
        problems.append(f"the workers run more than one image: {sorted(images)}")
    autoscaled = {s["spec"]["scaleTargetRef"]["name"] for s in find_all(objects, "ScaledObject")}
    autoscaled |= {
        h["spec"]["scaleTargetRef"]["name"] for h in find_all(objects, "HorizontalPodAutoscaler")
    }
    for name, (kind, _, _) in WORKERS.items():
        found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
        if len(found) != 1:
            problems.append(f"{name}: not one {kind}")
        else:
            problems += worker_problems(found[0], settings, autoscaled)
    job = find(objects, "Job", MIGRATE_JOB)
    problems += command_problems(
        MIGRATE_JOB, pod_spec(job)["containers"][0].get("args", []), ["migrate"]
    )
    if pod_spec(job).get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{MIGRATE_JOB}: restartPolicy must be Never or OnFailure")
    if not job["spec"].get("activeDeadlineSeconds"):
        problems.append(f"{MIGRATE_JOB}: no activeDeadlineSeconds: a stuck release never fails")
    problems += maintain_problems(objects)
    for obj in workloads(objects):
        container = pod_spec(obj)["containers"][0]
        expected = (
            (MIGRATE_SECRET, "MIGRATE_DATABASE_URL")
            if obj["kind"] in ONE_SHOT_KINDS
            else (WORKER_SECRET, "DATABASE_URL")
        )
        if secret_ref(container, "DATABASE_URL") != expected:
            problems.append(
                f"{name_of(obj)}: DATABASE_URL is not {expected[1]} of Secret {expected[0]}"
            )
        if obj["kind"] not in ONE_SHOT_KINDS and ("Secret", MIGRATE_SECRET) in references(obj):
            problems.append(f"{name_of(obj)}: reads {MIGRATE_SECRET}: only migrate is the owner")
        if obj["metadata"]["name"] != MAINTAIN_CRONJOB and ("Secret", ARCHIVE_SECRET) in references(
            obj
        ):
            problems.append(f"{name_of(obj)}: reads {ARCHIVE_SECRET}: only maintain archives")
    return problems + pod_problems(objects)


def maintain_problems(objects: list[Object]) -> list[str]:
    """`llm-usage maintain` hourly, one run at a time, failed runs kept; its archive's URL from
    a Secret key that must be there (no key, no pod: never an archive on the pod's disk)."""
    found = [o for o in find_all(objects, "CronJob") if o["metadata"]["name"] == MAINTAIN_CRONJOB]
    if len(found) != 1:
        return [f"{MAINTAIN_CRONJOB}: not one CronJob"]
    cron = found[0]
    spec, job = cron["spec"], cron["spec"]["jobTemplate"]["spec"]
    where = f"CronJob/{MAINTAIN_CRONJOB}"
    container = pod_spec(cron)["containers"][0]
    problems = command_problems(MAINTAIN_CRONJOB, container.get("args", []), ["maintain"])
    if not re.fullmatch(r"\d+ \* \* \* \*", spec.get("schedule", "")):
        problems.append(f"{where}: schedule {spec.get('schedule')!r} is not hourly")
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append(f"{where}: concurrencyPolicy is not Forbid: two runs could overlap")
    if not spec.get("startingDeadlineSeconds"):
        problems.append(f"{where}: no startingDeadlineSeconds: missed runs pile up")
    if not spec.get("failedJobsHistoryLimit") or "successfulJobsHistoryLimit" not in spec:
        problems.append(f"{where}: no history limits (a failed run must stay for its logs)")
    if pod_spec(cron).get("restartPolicy") != "Never":
        problems.append(f"{where}: restartPolicy is not Never")
    deadline = job.get("activeDeadlineSeconds")
    if not deadline or deadline >= 3600:
        problems.append(f"{where}: activeDeadlineSeconds {deadline} does not end a run in the hour")
    archive = env_of(container).get("ARCHIVE_URL", {}).get("valueFrom", {}).get("secretKeyRef")
    if not archive or archive["name"] != ARCHIVE_SECRET or archive.get("optional", False):
        problems.append(f"{where}: ARCHIVE_URL is not required from Secret {ARCHIVE_SECRET}")
    labels = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    store = [
        policy
        for policy in find_all(objects, "NetworkPolicy")
        if policy["spec"].get("podSelector") != {}
        and labels_match(policy["spec"]["podSelector"], labels)
        and policy["spec"].get("egress")
    ]
    if not store:
        problems.append(f"{where}: no NetworkPolicy lets it reach the archive's object store")
    return problems


def worker_problems(obj: Object, settings: dict[str, str], autoscaled: set[str]) -> list[str]:
    problems = []
    name = obj["metadata"]["name"]
    _, args, port_setting = WORKERS[name]
    container = pod_spec(obj)["containers"][0]
    port = int(settings[port_setting])
    problems += command_problems(name, container.get("args", []), args)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or container_port(container, get.get("port")) != port:
            problems.append(f"{name}: {probe} does not ask {path} on {port_setting}")
    template = obj["spec"]["template"]["metadata"]
    scraped = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }
    if any(template.get("annotations", {}).get(k) != v for k, v in scraped.items()):
        problems.append(f"{name}: its pods do not ask to be scraped on {port_setting}")
    # deploy/prometheus/prometheus-kubernetes.yml: `job` is this label, the rules select on it.
    labels = template.get("labels", {})
    if labels.get("app.kubernetes.io/name") != name or "app.kubernetes.io/part-of" not in labels:
        problems.append(f"{name}: its pods' labels do not name the Prometheus job")
    grace = pod_spec(obj).get("terminationGracePeriodSeconds", 30)
    drain = DRAIN_SECONDS
    if name == API:
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
        seconds = pre_stop.get("seconds", 0)
        if not PRE_STOP_SECONDS[0] <= seconds <= PRE_STOP_SECONDS[1]:
            problems.append(f"{name}: no preStop sleep of 5-10 s before uvicorn stops")
        drain = seconds + GRACEFUL_SHUTDOWN_SECONDS
    if grace < drain + GRACE_MARGIN_SECONDS:
        problems.append(f"{name}: terminationGracePeriodSeconds {grace} is within the drain")
    if name in autoscaled and "replicas" in obj["spec"]:
        problems.append(f"{name}: sets replicas, which its autoscaler owns (an apply undoes it)")
    return problems


def pod_problems(objects: list[Object]) -> list[str]:
    problems = []
    for obj in workloads(objects):
        spec = pod_spec(obj)
        if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append(f"{name_of(obj)}: may run as root")
        # A Service named like a setting's prefix (`api`) would give every pod API_PORT=tcp://….
        if spec.get("enableServiceLinks") is not False:
            problems.append(f"{name_of(obj)}: enableServiceLinks is not false")
        if obj["kind"] not in ONE_SHOT_KINDS:
            zones = [
                c
                for c in spec.get("topologySpreadConstraints", [])
                if c.get("topologyKey") == "topology.kubernetes.io/zone"
            ]
            if not zones or zones[0].get("whenUnsatisfiable") != "ScheduleAnyway":
                problems.append(f"{name_of(obj)}: not spread over zones (ScheduleAnyway)")
        for container in spec["containers"]:
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                if set(resources.get(kind, {})) != {"cpu", "memory", "ephemeral-storage"}:
                    problems.append(f"{name_of(obj)}: no cpu, memory and ephemeral-storage {kind}")
            security = container.get("securityContext", {})
            if not security.get("readOnlyRootFilesystem") or security.get(
                "allowPrivilegeEscalation", True
            ):
                problems.append(f"{name_of(obj)}: writable root or privilege escalation")
    return problems


def disruption_problems(objects: list[Object]) -> list[str]:
    problems = []
    budgets = find_all(objects, "PodDisruptionBudget")
    for budget in budgets:
        # Not ready (a consumer during a database outage) must not mean "cannot be evicted".
        if budget["spec"].get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
            problems.append(f"{name_of(budget)}: unhealthyPodEvictionPolicy is not AlwaysAllow")
    for name, (kind, _, _) in WORKERS.items():
        labels = find(objects, kind, name)["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if labels_match(b["spec"]["selector"], labels)]
        if len(covering) != 1:
            problems.append(f"{name}: {len(covering)} PodDisruptionBudgets cover its pods")
        elif covering[0]["spec"].get("maxUnavailable") is None:
            problems.append(f"{name}: its PodDisruptionBudget can block a drain (minAvailable)")
    return problems


def scale_up_problems(where: str, behavior: Object) -> list[str]:
    """Each step rebalances a group: a minute's stabilization, two pods a minute at most."""
    up = behavior.get("scaleUp", {})
    policies = up.get("policies", [])
    if up.get("stabilizationWindowSeconds", 0) < 60 or not policies:
        return [f"{where}: no scale-up policy (the default doubles every 15 s)"]
    if any(p.get("type") != "Pods" or p["value"] > 2 or p["periodSeconds"] < 60 for p in policies):
        return [f"{where}: scales up faster than two pods a minute"]
    return []


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
        if spec["scaleTargetRef"].get("kind", "Deployment") != WORKERS[name][0]:
            problems.append(f"{where}: does not scale the {WORKERS[name][0]}")
        if spec.get("maxReplicaCount") != partitions:
            problems.append(
                f"{where}: maxReplicaCount {spec.get('maxReplicaCount')} is not the usage "
                f"topic's {partitions} partitions"
            )
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
        problems += scale_up_problems(where, behavior.get("behavior", {}))
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
    return problems + api_scaling_problems(objects)


def api_scaling_problems(objects: list[Object]) -> list[str]:
    problems = []
    hpas = [
        h
        for h in find_all(objects, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == API
    ]
    if len(hpas) != 1:
        problems.append(f"{API}: {len(hpas)} HorizontalPodAutoscalers scale it")
    else:
        spec = hpas[0]["spec"]
        on_cpu = [m for m in spec.get("metrics", []) if m.get("resource", {}).get("name") == "cpu"]
        if spec["scaleTargetRef"].get("kind") != "Deployment" or not on_cpu:
            problems.append(f"{name_of(hpas[0])}: does not scale the API's Deployment on CPU")
        problems += scale_up_problems(name_of(hpas[0]), spec.get("behavior", {}))
    return problems


def trigger_authentication_problems(
    objects: list[Object], where: str, trigger: Object
) -> list[str]:
    """KEDA reads the lag as its own Describe-only user, never with a worker's credentials."""
    name = trigger.get("authenticationRef", {}).get("name")
    found = [t for t in find_all(objects, "TriggerAuthentication") if t["metadata"]["name"] == name]
    if not found:
        return [f"{where}: no TriggerAuthentication {name!r} for the SASL credentials"]
    spec = found[0]["spec"]
    secrets = {
        ref["parameter"]: (ref["name"], ref["key"]) for ref in spec.get("secretTargetRef", [])
    }
    maps = {
        ref["parameter"]: (ref["name"], ref["key"]) for ref in spec.get("configMapTargetRef", [])
    }
    problems = []
    if secrets.get("password") != (KEDA_USER, "password"):
        problems.append(f"{where}: KEDA's password is not {KEDA_USER}'s (Secret {KEDA_USER})")
    user = None
    if "username" in maps:
        map_name, key = maps["username"]
        holding = [m for m in find_all(objects, "ConfigMap") if m["metadata"]["name"] == map_name]
        user = holding[0].get("data", {}).get(key) if holding else None
    if user != KEDA_USER:
        problems.append(f"{where}: KEDA's user name is {user!r}, not {KEDA_USER!r}")
    if settings_tls(objects) and secrets.get("ca") != (KAFKA_CA_SECRET, "ca.crt"):
        problems.append(f"{where}: KEDA does not get the broker's CA from {KAFKA_CA_SECRET}")
    return problems


def settings_tls(objects: list[Object]) -> bool:
    return config(objects)["KAFKA_SECURITY_PROTOCOL"].endswith("SSL")


def static_membership_problems(objects: list[Object]) -> list[str]:
    """Each consumer replica keeps a name across restarts, its Kafka static member id."""
    problems = []
    services = find_all(objects, "Service")
    for name in SCALED:
        obj = workload(objects, name)
        spec = obj["spec"]
        if spec.get("podManagementPolicy") != "Parallel":
            problems.append(f"{name}: podManagementPolicy is not Parallel")
        governing = [s for s in services if s["metadata"]["name"] == spec.get("serviceName")]
        labels = spec["template"]["metadata"]["labels"]
        if not (
            governing
            and governing[0]["spec"].get("clusterIP") == "None"
            and labels_match({"matchLabels": governing[0]["spec"].get("selector", {})}, labels)
        ):
            problems.append(f"{name}: serviceName names no headless Service of its pods")
        entry = env_of(worker(objects, name)).get("KAFKA_GROUP_INSTANCE_ID", {})
        if entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
            problems.append(f"{name}: KAFKA_GROUP_INSTANCE_ID is not the pod's name")
    return problems


def bootstrap_values(objects: list[Object]) -> list[tuple[str, str]]:
    """Every Kafka bootstrap address the manifests give, and where."""
    found = [
        (f"{name_of(m)} KAFKA_BOOTSTRAP_SERVERS", m["data"]["KAFKA_BOOTSTRAP_SERVERS"])
        for m in find_all(objects, "ConfigMap")
        if "KAFKA_BOOTSTRAP_SERVERS" in m.get("data", {})
    ]
    for obj in workloads(objects):
        for container in pod_spec(obj)["containers"]:
            entry = env_of(container).get("KAFKA_BOOTSTRAP_SERVERS", {})
            if "value" in entry:
                found.append((f"{name_of(obj)} KAFKA_BOOTSTRAP_SERVERS", entry["value"]))
    for scaled in find_all(objects, "ScaledObject"):
        for trigger in scaled["spec"].get("triggers", []):
            for key in ("bootstrapServers", "brokerList"):
                if key in trigger.get("metadata", {}):
                    found.append((f"{name_of(scaled)} {key}", trigger["metadata"][key]))
    return found


def bootstrap_problems(objects: list[Object]) -> list[str]:
    """KEDA's scaler resolves a short name in its own namespace, and Kafka lives in another:
    every address is `<service>.<namespace>.svc`."""
    problems = [
        f"{where}: {host!r} is not a cluster-qualified name (<service>.<namespace>.svc)"
        for where, value in bootstrap_values(objects)
        for host in (address.rsplit(":", 1)[0] for address in value.split(","))
        if not re.fullmatch(r"[a-z0-9-]+\.[a-z0-9-]+\.svc(\.cluster\.local)?", host)
    ]
    return problems or topic_namespace_problems(objects)


def kafka_namespace(objects: list[Object]) -> str:
    return config(objects)["KAFKA_BOOTSTRAP_SERVERS"].split(",")[0].split(".")[1]


def topic_namespace_problems(objects: list[Object]) -> list[str]:
    """The topics go where Kafka's topic operator watches: Kafka's namespace, never the
    pipeline's (deleting a release must not delete them)."""
    namespace = kafka_namespace(objects)
    return [
        f"{name_of(t)}: in namespace {t['metadata'].get('namespace')!r}, not Kafka's {namespace!r}"
        for t in find_all(objects, "KafkaTopic")
        if t["metadata"].get("namespace") != namespace
    ]


def kafka_credentials_problems(objects: list[Object]) -> list[str]:
    """With SASL, each Kafka client logs in as its own KafkaUser; the rest get no credentials."""
    problems = []
    sasl = config(objects)["KAFKA_SECURITY_PROTOCOL"].startswith("SASL_")
    for obj in workloads(objects):
        name = obj["metadata"]["name"]
        container = pod_spec(obj)["containers"][0]
        env = env_of(container)
        user = KAFKA_USERS.get(name) if obj["kind"] not in ONE_SHOT_KINDS else None
        if sasl and user is not None:
            if env.get("KAFKA_SASL_USERNAME", {}).get("value") != user:
                problems.append(f"{name_of(obj)}: KAFKA_SASL_USERNAME is not {user!r}")
            if secret_ref(container, "KAFKA_SASL_PASSWORD") != (user, "password"):
                problems.append(f"{name_of(obj)}: KAFKA_SASL_PASSWORD is not {user}'s password")
            if settings_tls(objects) and ("Secret", KAFKA_CA_SECRET) not in references(obj):
                problems.append(f"{name_of(obj)}: does not mount the broker's CA")
        elif {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"} & set(env) or (
            "Secret",
            KAFKA_CA_SECRET,
        ) in references(obj):
            problems.append(f"{name_of(obj)}: gets Kafka credentials it has no use for")
    return problems


def network_problems(objects: list[Object]) -> list[str]:
    """Ingress only to the ports that serve, from who needs them; egress to DNS, Kafka and
    PostgreSQL only."""
    problems = []
    policies = find_all(objects, "NetworkPolicy")
    settings = config(objects)
    metrics_port, api_port = int(settings["METRICS_PORT"]), int(settings["API_PORT"])
    deny = [
        p
        for p in policies
        if p["spec"].get("podSelector") == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    if not deny:
        problems.append("no NetworkPolicy refuses by default what is not allowed")
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = {p.get("port") for p in rule.get("ports", [])}
            sources = rule.get("from", [])
            if not sources or not ports:
                problems.append(f"{name_of(policy)}: lets in from anywhere or to any port")
            if not ports <= {metrics_port, api_port}:
                problems.append(f"{name_of(policy)}: opens ports {sorted(ports)}")
            namespaces = {
                s.get("namespaceSelector", {})
                .get("matchLabels", {})
                .get("kubernetes.io/metadata.name")
                for s in sources
            }
            if metrics_port in ports and namespaces != {PROMETHEUS_NAMESPACE}:
                problems.append(
                    f"{name_of(policy)}: lets {sorted(map(str, namespaces))} scrape METRICS_PORT"
                )
    egress = [rule for p in policies for rule in p["spec"].get("egress", [])]
    allowed = {
        (p.get("protocol", "TCP"), p.get("port")) for rule in egress for p in rule.get("ports", [])
    }
    for needed in (("UDP", 53), ("TCP", 5432)):
        if needed not in allowed:
            problems.append(f"no egress to {needed[0]} {needed[1]}")
    kafka_ports = {int(a.rsplit(":", 1)[1]) for a in settings["KAFKA_BOOTSTRAP_SERVERS"].split(",")}
    to_kafka = {
        p.get("port")
        for rule in egress
        for peer in rule.get("to", [])
        if peer.get("namespaceSelector", {})
        .get("matchLabels", {})
        .get("kubernetes.io/metadata.name")
        == kafka_namespace(objects)
        for p in rule.get("ports", [])
    }
    if not kafka_ports <= to_kafka:
        problems.append(f"no egress to Kafka's namespace on {sorted(kafka_ports)}")
    return problems


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
        dedup_hours = int(settings["DEDUP_WINDOW_HOURS"])
        if retention_hours < MIN_USAGE_RETENTION_HOURS:
            problems.append(f"usage topic: keeps {retention_hours} h, less than 7 days")
        elif dedup_hours < retention_hours + DEDUP_MARGIN_HOURS:
            problems.append(
                f"DEDUP_WINDOW_HOURS={dedup_hours} does not outlast the usage topic's "
                f"{retention_hours} h retention by {DEDUP_MARGIN_HOURS} h"
            )
    return problems


CREDENTIALS_IN_URL = re.compile(r"://[^/@\s:]+:[^/@\s]+@")


def secret_problems(objects: list[Object]) -> list[str]:
    problems = [f"{name_of(o)}: a Secret in the manifests" for o in find_all(objects, "Secret")]
    for held in find_all(objects, "ConfigMap"):
        for variable in SECRET_ONLY:
            if variable in held.get("data", {}):
                problems.append(f"{name_of(held)}: holds {variable}")
    for obj in workloads(objects):
        for container in pod_spec(obj)["containers"]:
            env = env_of(container)
            for variable in SECRET_ONLY:
                if variable in env and secret_ref(container, variable) is None:
                    problems.append(f"{name_of(obj)}: {variable} is written in the manifest")
    text = yaml.safe_dump_all(objects)
    if CREDENTIALS_IN_URL.search(text):
        problems.append("a URL with a password is written in the manifests")
    return problems


def config_problems(objects: list[Object]) -> list[str]:
    settings = config(objects)
    data = config_map(objects).get("data", {})
    placeholders = {variable: "from-a-secret" for variable in SECRET_VARIABLES}
    return settings_problems("ConfigMap", {**placeholders, **data}) + [
        f"{name_of(obj)}: {entry['name']} is not a setting llm-usage reads"
        for obj in workloads(objects)
        for container in pod_spec(obj)["containers"]
        for entry in container.get("env", [])
        if entry["name"] not in settings
    ]


def outside_problems(objects: list[Object]) -> list[str]:
    """What a workload needs is in the manifests, or in the list of what is made beforehand."""
    held = keys_of(objects)
    return [
        f"{name_of(obj)}: needs {kind}/{name}, neither in the manifests nor made beforehand"
        for obj in workloads(objects)
        for kind, name in sorted(references(obj))
        if (kind, name) not in held and (kind, name) not in MADE_OUTSIDE
    ]


def manifest_problems(objects: list[Object], replication: tuple[int, int]) -> list[str]:
    return (
        workload_problems(objects)
        + disruption_problems(objects)
        + scaling_problems(objects)
        + static_membership_problems(objects)
        + bootstrap_problems(objects)
        + kafka_credentials_problems(objects)
        + network_problems(objects)
        + topic_problems(objects, replication)
        + secret_problems(objects)
        + config_problems(objects)
        + outside_problems(objects)
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_keeps_the_promises(rendered: dict[str, list[Object]], overlay: str) -> None:
    assert manifest_problems(rendered[overlay], REPLICATION[overlay]) == []


def migrate_selection_problems(objects: list[Object]) -> list[str]:
    """`kubectl apply -k <overlay> -l app.kubernetes.io/component=migrate` applies the Job first,
    alone, maybe on a namespace that holds nothing else yet: what it needs is selected with it
    or made before it (docs/operations.md, "The first release")."""
    key, value = MIGRATE_LABEL
    selected = [o for o in objects if o["metadata"].get("labels", {}).get(key) == value]
    jobs = [o for o in selected if o["kind"] == "Job"]
    if [name_of(o) for o in jobs] != [f"Job/{MIGRATE_JOB}"]:
        return [f"the label selects {[name_of(o) for o in selected]}, not the migrate Job"]
    available = keys_of(selected) | MADE_BEFORE_THE_JOB
    return [
        f"Job/{MIGRATE_JOB}: needs {kind}/{name}, which the first release has not made yet"
        for kind, name in sorted(references(jobs[0]))
        if (kind, name) not in available
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_migrate_job_applies_alone_on_a_new_namespace(
    overlays: dict[str, list[Object]], overlay: str
) -> None:
    assert migrate_selection_problems(overlays[overlay]) == []


def _j_service_account(objects: list[Object]) -> None:
    pod_spec(find(objects, "Job", MIGRATE_JOB))["serviceAccountName"] = "llm-usage"


def _j_config_map(objects: list[Object]) -> None:
    container = pod_spec(find(objects, "Job", MIGRATE_JOB))["containers"][0]
    container["envFrom"] = [{"configMapRef": {"name": config_map(objects)["metadata"]["name"]}}]


def _j_worker_secret(objects: list[Object]) -> None:
    container = pod_spec(find(objects, "Job", MIGRATE_JOB))["containers"][0]
    env_of(container)["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] = WORKER_SECRET


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (_j_service_account, "needs ServiceAccount/llm-usage"),
        (_j_config_map, "needs ConfigMap/llm-usage-config-"),
        (_j_worker_secret, "needs Secret/llm-usage-secrets"),
    ],
)
def test_a_migrate_job_that_needs_more_than_the_first_release_made_is_caught(
    overlays: dict[str, list[Object]], break_it: Callable[[list[Object]], None], expected: str
) -> None:
    objects = copy.deepcopy(overlays["prod"])
    break_it(objects)

    assert any(expected in p for p in migrate_selection_problems(objects))


def test_what_is_made_beforehand_is_documented() -> None:
    """Every Secret and ConfigMap the manifests name but do not hold is in the operator's steps
    (docs/operations.md, and docs/storage.md for the archive's)."""
    steps = "".join((ROOT / "docs" / page).read_text() for page in ("operations.md", "storage.md"))
    made = sorted(name for kind, name in MADE_OUTSIDE if kind != "ServiceAccount")

    assert [name for name in made if f"`{name}`" not in steps] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_overlay_holds_a_topic(overlays: dict[str, list[Object]], overlay: str) -> None:
    """Deleting an overlay (its namespace and all) must not delete the topics and the usage not
    yet billed: the topics are applied apart, from deploy/k8s/kafka-topics."""
    assert find_all(overlays[overlay], "KafkaTopic") == []


def test_environments_share_no_kafka_name(rendered: dict[str, list[Object]]) -> None:
    """Dev and prod on one Kafka cluster: no topic, KafkaTopic or consumer group in common."""

    def names(objects: list[Object]) -> set[str]:
        settings = config(objects)
        kafka = {
            settings[v]
            for v in (
                "USAGE_TOPIC",
                "DLQ_TOPIC",
                "ALERTS_TOPIC",
                "USAGE_GROUP_ID",
                "BUDGET_GROUP_ID",
            )
        }
        topics_ = find_all(objects, "KafkaTopic")
        return (
            kafka
            | {t["spec"].get("topicName", "") for t in topics_}
            | {f"KafkaTopic/{t['metadata']['name']}" for t in topics_}
        )

    dev, prod = names(rendered["dev"]), names(rendered["prod"])

    assert len(dev) == len(prod) == 8
    assert dev & prod == set()


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
    config_map(objects)["data"]["KAFKA_SASL_PASSWORD"] = "x"


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


def _m_keda_as_a_worker(objects: list[Object]) -> None:
    auth = find_all(objects, "TriggerAuthentication")[0]
    auth["spec"]["secretTargetRef"][0]["name"] = "llm-usage-ingest"


def _m_keda_user(objects: list[Object]) -> None:
    find(objects, "ConfigMap", KEDA_USER)["data"]["username"] = "llm-usage-ingest"


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
    pod_spec(workload(objects, "llm-usage-consume-usage"))["terminationGracePeriodSeconds"] = 30


def _m_probe(objects: list[Object]) -> None:
    worker(objects, "llm-usage-rollup-schedule")["readinessProbe"]["httpGet"]["path"] = "/healthz"


def _m_probe_port(objects: list[Object]) -> None:
    worker(objects, "llm-usage-consume-budget")["livenessProbe"]["httpGet"]["port"] = 8080


def _m_api_probe_port(objects: list[Object]) -> None:
    worker(objects, API)["readinessProbe"]["httpGet"]["port"] = 9108


def _m_no_limits(objects: list[Object]) -> None:
    del worker(objects, "llm-usage-consume-budget")["resources"]["limits"]


def _m_no_ephemeral_storage(objects: list[Object]) -> None:
    del worker(objects, API)["resources"]["requests"]["ephemeral-storage"]


def _m_replicas(objects: list[Object]) -> None:
    workload(objects, "llm-usage-consume-usage")["spec"]["replicas"] = 2


def _m_api_replicas(objects: list[Object]) -> None:
    workload(objects, API)["spec"]["replicas"] = 2


def _m_pdb(objects: list[Object]) -> None:
    budget = find(objects, "PodDisruptionBudget", "llm-usage-rollup-schedule")
    budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "other"


def _m_pdb_eviction(objects: list[Object]) -> None:
    del find(objects, "PodDisruptionBudget", API)["spec"]["unhealthyPodEvictionPolicy"]


def _m_worker_as_owner(objects: list[Object]) -> None:
    entry = {
        "name": "DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": MIGRATE_SECRET, "key": "MIGRATE_DATABASE_URL"}},
    }
    _replace_env(objects, "llm-usage-consume-budget", "DATABASE_URL", entry)


def _m_not_scraped(objects: list[Object]) -> None:
    template = workload(objects, "llm-usage-consume-budget")["spec"]["template"]
    template["metadata"]["annotations"]["prometheus.io/port"] = "9100"


def _m_api_scraped_on_metrics_port(objects: list[Object]) -> None:
    template = workload(objects, API)["spec"]["template"]
    template["metadata"]["annotations"]["prometheus.io/port"] = "9108"


def _m_job_label(objects: list[Object]) -> None:
    template = workload(objects, "llm-usage-rollup-schedule")["spec"]["template"]
    del template["metadata"]["labels"]["app.kubernetes.io/part-of"]


def _m_command(objects: list[Object]) -> None:
    worker(objects, "llm-usage-consume-usage")["args"] = ["consume", "budget"]


def _m_two_images(objects: list[Object]) -> None:
    worker(objects, "llm-usage-rollup-schedule")["image"] = "llm-usage-pipeline:other"


def _m_root(objects: list[Object]) -> None:
    pod_spec(find(objects, "Job", MIGRATE_JOB))["securityContext"]["runAsNonRoot"] = False


def _m_service_links(objects: list[Object]) -> None:
    del pod_spec(find(objects, "Job", MIGRATE_JOB))["enableServiceLinks"]


def _m_no_zone_spread(objects: list[Object]) -> None:
    spec = pod_spec(workload(objects, "llm-usage-rollup-schedule"))
    spec["topologySpreadConstraints"] = spec["topologySpreadConstraints"][1:]


def _m_unknown_setting(objects: list[Object]) -> None:
    config_map(objects)["data"]["KAFKA_BOOTSTRAP_SERVER"] = "k:9092"


def _m_bootstrap(objects: list[Object]) -> None:
    config_map(objects)["data"]["KAFKA_BOOTSTRAP_SERVERS"] = "other.kafka.svc:9093"


def _m_short_bootstrap(objects: list[Object]) -> None:
    scaled = find(objects, "ScaledObject", "llm-usage-consume-usage")
    scaled["spec"]["triggers"][0]["metadata"]["bootstrapServers"] = "kafka-kafka-bootstrap:9093"


def _m_topic_in_pipeline_namespace(objects: list[Object]) -> None:
    find(objects, "KafkaTopic", "llm-usage-recorded")["metadata"]["namespace"] = "llm-usage"


def _m_deployment_consumer(objects: list[Object]) -> None:
    find(objects, "ScaledObject", "llm-usage-consume-budget")["spec"]["scaleTargetRef"]["kind"] = (
        "Deployment"
    )


def _m_ordered_pods(objects: list[Object]) -> None:
    del workload(objects, "llm-usage-consume-usage")["spec"]["podManagementPolicy"]


def _m_no_static_member(objects: list[Object]) -> None:
    env = worker(objects, "llm-usage-consume-budget")["env"]
    env[:] = [e for e in env if e["name"] != "KAFKA_GROUP_INSTANCE_ID"]


def _m_no_scale_up_policy(objects: list[Object]) -> None:
    scaled = find(objects, "ScaledObject", "llm-usage-consume-usage")
    del scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleUp"]


def _m_shared_kafka_user(objects: list[Object]) -> None:
    entry = {
        "name": "KAFKA_SASL_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "llm-usage-ingest", "key": "password"}},
    }
    _replace_env(objects, "llm-usage-consume-budget", "KAFKA_SASL_PASSWORD", entry)


def _m_rollup_with_kafka(objects: list[Object]) -> None:
    worker(objects, "llm-usage-rollup-schedule")["env"].append(
        {"name": "KAFKA_SASL_USERNAME", "value": "llm-usage-ingest"}
    )


def _m_no_api_drain(objects: list[Object]) -> None:
    del worker(objects, API)["lifecycle"]


def _m_open_metrics(objects: list[Object]) -> None:
    policy = find(objects, "NetworkPolicy", "llm-usage-prometheus")
    policy["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]


def _m_no_default_deny(objects: list[Object]) -> None:
    objects.remove(find(objects, "NetworkPolicy", "llm-usage-default-deny"))


def _m_no_kafka_egress(objects: list[Object]) -> None:
    objects.remove(find(objects, "NetworkPolicy", "llm-usage-kafka"))


def _m_maintain(objects: list[Object]) -> Object:
    return find(objects, "CronJob", MAINTAIN_CRONJOB)


def _m_maintain_overlaps(objects: list[Object]) -> None:
    _m_maintain(objects)["spec"]["concurrencyPolicy"] = "Allow"


def _m_maintain_daily(objects: list[Object]) -> None:
    _m_maintain(objects)["spec"]["schedule"] = "7 3 * * *"


def _m_maintain_command(objects: list[Object]) -> None:
    pod_spec(_m_maintain(objects))["containers"][0]["args"] = ["migrate"]


def _m_maintain_as_worker(objects: list[Object]) -> None:
    container = pod_spec(_m_maintain(objects))["containers"][0]
    env_of(container)["DATABASE_URL"]["valueFrom"]["secretKeyRef"] = {
        "name": WORKER_SECRET,
        "key": "DATABASE_URL",
    }


def _m_maintain_archive_optional(objects: list[Object]) -> None:
    container = pod_spec(_m_maintain(objects))["containers"][0]
    env_of(container)["ARCHIVE_URL"]["valueFrom"]["secretKeyRef"]["optional"] = True


def _m_maintain_archive_on_pod(objects: list[Object]) -> None:
    container = pod_spec(_m_maintain(objects))["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != "ARCHIVE_URL"] + [
        {"name": "ARCHIVE_URL", "value": "/tmp/archive"}  # noqa: S108 - the broken copy
    ]


def _m_maintain_no_history(objects: list[Object]) -> None:
    del _m_maintain(objects)["spec"]["failedJobsHistoryLimit"]


def _m_maintain_root(objects: list[Object]) -> None:
    container = pod_spec(_m_maintain(objects))["containers"][0]
    container["securityContext"]["readOnlyRootFilesystem"] = False


def _m_maintain_no_store(objects: list[Object]) -> None:
    objects.remove(find(objects, "NetworkPolicy", "llm-usage-maintain-archive"))


def _m_archive_secret_elsewhere(objects: list[Object]) -> None:
    worker(objects, "llm-usage-rollup-schedule")["env"].append(
        {
            "name": "ARCHIVE_URL",
            "valueFrom": {"secretKeyRef": {"name": ARCHIVE_SECRET, "key": "ARCHIVE_URL"}},
        }
    )


def _m_archive_key_in_config(objects: list[Object]) -> None:
    config_map(objects)["data"]["ARCHIVE_S3_SECRET_ACCESS_KEY"] = "x"


def _m_unknown_secret(objects: list[Object]) -> None:
    worker(objects, API)["envFrom"].append({"secretRef": {"name": "api-extra"}})


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
        (_m_keda_as_a_worker, "KEDA's password is not llm-usage-keda's"),
        (_m_keda_user, "KEDA's user name is 'llm-usage-ingest'"),
        (_m_compacted_alerts, "KafkaTopic llm_budget_alerts: cleanup.policy"),
        (_m_short_retention, "keeps 72.0 h, less than 7 days"),
        (_m_long_retention, "DEDUP_WINDOW_HOURS=192 does not outlast"),
        (_m_insync, "llm_usage_recorded.dlq: replicas and min.insync.replicas (3, 3)"),
        (_m_grace, "terminationGracePeriodSeconds 30"),
        (_m_probe, "readinessProbe does not ask /readyz"),
        (_m_probe_port, "livenessProbe does not ask /healthz on METRICS_PORT"),
        (_m_api_probe_port, "llm-usage-api: readinessProbe does not ask /readyz on API_PORT"),
        (_m_no_limits, "StatefulSet/llm-usage-consume-budget: no cpu, memory and ephemeral"),
        (_m_no_ephemeral_storage, "Deployment/llm-usage-api: no cpu, memory and ephemeral"),
        (_m_replicas, "llm-usage-consume-usage: sets replicas, which its autoscaler owns"),
        (_m_api_replicas, "llm-usage-api: sets replicas, which its autoscaler owns"),
        (_m_pdb, "llm-usage-rollup-schedule: 0 PodDisruptionBudgets"),
        (_m_pdb_eviction, "PodDisruptionBudget/llm-usage-api: unhealthyPodEvictionPolicy"),
        (_m_worker_as_owner, "consume-budget: DATABASE_URL is not DATABASE_URL of Secret"),
        (_m_worker_as_owner, "consume-budget: reads llm-usage-migrate"),
        (_m_not_scraped, "llm-usage-consume-budget: its pods do not ask to be scraped"),
        (_m_api_scraped_on_metrics_port, "llm-usage-api: its pods do not ask to be scraped on API"),
        (_m_job_label, "llm-usage-rollup-schedule: its pods' labels do not name the Prometheus"),
        (_m_command, "runs `llm-usage consume budget`"),
        (_m_two_images, "more than one image"),
        (_m_root, "Job/llm-usage-migrate: may run as root"),
        (_m_service_links, "Job/llm-usage-migrate: enableServiceLinks is not false"),
        (_m_no_zone_spread, "llm-usage-rollup-schedule: not spread over zones"),
        (_m_unknown_setting, "KAFKA_BOOTSTRAP_SERVER is not a setting"),
        (_m_bootstrap, "bootstrapServers is 'kafka-kafka-bootstrap.kafka.svc:9093', not 'other"),
        (_m_short_bootstrap, "'kafka-kafka-bootstrap' is not a cluster-qualified name"),
        (_m_topic_in_pipeline_namespace, "in namespace 'llm-usage', not Kafka's 'kafka'"),
        (_m_deployment_consumer, "ScaledObject for llm-usage-consume-budget: does not scale the"),
        (_m_ordered_pods, "llm-usage-consume-usage: podManagementPolicy is not Parallel"),
        (_m_no_static_member, "KAFKA_GROUP_INSTANCE_ID is not the pod's name"),
        (_m_no_scale_up_policy, "no scale-up policy"),
        (_m_shared_kafka_user, "consume-budget: KAFKA_SASL_PASSWORD is not llm-usage-budget's"),
        (_m_rollup_with_kafka, "rollup-schedule: gets Kafka credentials it has no use for"),
        (_m_no_api_drain, "llm-usage-api: no preStop sleep"),
        (_m_open_metrics, "llm-usage-prometheus: lets ['None'] scrape METRICS_PORT"),
        (_m_no_default_deny, "no NetworkPolicy refuses by default"),
        (_m_no_kafka_egress, "no egress to Kafka's namespace on [9093]"),
        (_m_unknown_secret, "needs Secret/api-extra, neither in the manifests nor made"),
        (_m_maintain_overlaps, "CronJob/llm-usage-maintain: concurrencyPolicy is not Forbid"),
        (_m_maintain_daily, "schedule '7 3 * * *' is not hourly"),
        (_m_maintain_command, "llm-usage-maintain: runs `llm-usage migrate`"),
        (_m_maintain_as_worker, "CronJob/llm-usage-maintain: DATABASE_URL is not MIGRATE_DATA"),
        (_m_maintain_archive_optional, "ARCHIVE_URL is not required from Secret llm-usage-arc"),
        (_m_maintain_archive_on_pod, "ARCHIVE_URL is not required from Secret llm-usage-arc"),
        (_m_maintain_no_history, "CronJob/llm-usage-maintain: no history limits"),
        (_m_maintain_root, "CronJob/llm-usage-maintain: writable root"),
        (_m_maintain_no_store, "no NetworkPolicy lets it reach the archive's object store"),
        (_m_archive_secret_elsewhere, "rollup-schedule: reads llm-usage-archive"),
        (_m_archive_key_in_config, "holds ARCHIVE_S3_SECRET_ACCESS_KEY"),
    ],
)
def test_a_broken_promise_is_caught(
    rendered: dict[str, list[Object]], break_it: Callable[[list[Object]], None], expected: str
) -> None:
    objects = copy.deepcopy(rendered["prod"])
    break_it(objects)

    problems = manifest_problems(objects, REPLICATION["prod"])

    assert any(expected in problem for problem in problems), problems


def test_topics_that_grow_without_the_scaling_are_caught(
    kustomize: Path, tmp_path: Path, overlays: dict[str, list[Object]]
) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        f"resources:\n  - {relative(TOPICS / 'prod', tmp_path)}\npatches:\n  - path: topic.yaml\n"
    )
    (tmp_path / "topic.yaml").write_text(
        "apiVersion: kafka.strimzi.io/v1\nkind: KafkaTopic\n"
        "metadata:\n  name: llm-usage-recorded\nspec:\n  partitions: 18\n"
    )

    objects = overlays["prod"] + render(kustomize, tmp_path)
    problems = manifest_problems(objects, REPLICATION["prod"])

    assert len([p for p in problems if "not the usage topic's 18 partitions" in p]) == 2


# PostgreSQL's default max_connections, less what it keeps for superusers (3), the migrate Job
# and a few operator commands.
MAX_CONNECTIONS = 100
CONNECTIONS_KEPT_FREE = 10


def replica_maxima(objects: list[Object]) -> dict[str, int]:
    """The most replicas each worker can run: its autoscaler's maximum, else its replicas."""
    maxima = {name: int(workload(objects, name)["spec"].get("replicas", 1)) for name in WORKERS}
    for scaled in find_all(objects, "ScaledObject"):
        maxima[scaled["spec"]["scaleTargetRef"]["name"]] = scaled["spec"]["maxReplicaCount"]
    for hpa in find_all(objects, "HorizontalPodAutoscaler"):
        maxima[hpa["spec"]["scaleTargetRef"]["name"]] = hpa["spec"]["maxReplicas"]
    return maxima


def connection_ceiling(objects: list[Object]) -> int:
    """PostgreSQL connections at the replica maxima (docs/contract.md, DATABASE_POOL_SIZE): the
    pool of each replica, and the budget consumer's LISTEN and relay lock connections, the
    rollup's pool of 2 and its lock connection."""
    settings = config(objects)
    per_replica = {
        "llm-usage-consume-usage": int(settings["DATABASE_POOL_SIZE"]),
        "llm-usage-consume-budget": int(settings["BUDGET_DATABASE_POOL_SIZE"]) + 2,
        "llm-usage-rollup-schedule": 2 + 1,
        API: int(settings["DATABASE_POOL_SIZE"]),
    }
    maxima = replica_maxima(objects)
    return sum(per_replica[name] * maxima[name] for name in WORKERS)


def test_production_at_its_maxima_fits_the_database_connections(
    rendered: dict[str, list[Object]],
) -> None:
    assert connection_ceiling(rendered["prod"]) <= MAX_CONNECTIONS - CONNECTIONS_KEPT_FREE


def test_more_api_replicas_than_the_connections_allow_are_caught(
    rendered: dict[str, list[Object]],
) -> None:
    objects = copy.deepcopy(rendered["prod"])
    find(objects, "HorizontalPodAutoscaler", API)["spec"]["maxReplicas"] = 12

    assert connection_ceiling(objects) > MAX_CONNECTIONS - CONNECTIONS_KEPT_FREE


def test_every_kafka_user_production_logs_in_as_is_shipped_with_its_group(
    kustomize: Path, rendered: dict[str, list[Object]]
) -> None:
    """The users named in overlays/prod are the KafkaUsers of deploy/k8s/kafka-users, and each
    consumer's user may read the group that overlay gives it."""
    users = {u["metadata"]["name"]: u for u in render(kustomize, K8S / "kafka-users")}
    settings = config(rendered["prod"])

    def groups(user: str) -> set[str]:
        acls = users[user]["spec"].get("authorization", {}).get("acls", [])
        return {
            acl["resource"]["name"]
            for acl in acls
            if acl["resource"]["type"] == "group" and "Read" in acl["operations"]
        }

    assert {*KAFKA_USERS.values(), KEDA_USER} <= set(users)
    assert settings["USAGE_GROUP_ID"] in groups(KAFKA_USERS["llm-usage-consume-usage"])
    assert settings["BUDGET_GROUP_ID"] in groups(KAFKA_USERS["llm-usage-consume-budget"])
