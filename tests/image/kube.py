"""The dev overlay's rendered manifests, made fit for `podman kube play` on this machine.

What podman 4.3's kube play takes is kept: the ConfigMap, the Deployments, and the StatefulSets
as Deployments (kube play has no StatefulSet; the pod name stays the stable identity). What it
cannot run is dropped and named in `DROPPED`: Namespace, ServiceAccount, Services, PDBs, HPA,
KEDA ScaledObjects, NetworkPolicies and the migrate Job (run as a plain container instead).

The workloads then point at the local services: the ConfigMap's bootstrap servers and topics, a
test Secret with the DSN, the PostgreSQL socket as a hostPath volume, and, because every pod
shares the host's network, one metrics port per worker (the manifests' 9108 would collide).
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.tools.kustomize import ensure_kustomize

ROOT = Path(__file__).resolve().parents[2]
KEPT = ("ConfigMap", "Deployment", "StatefulSet")


def render_dev_overlay() -> list[dict[str, Any]]:
    kustomize = ensure_kustomize()
    result = subprocess.run(
        [str(kustomize), "build", str(ROOT / "deploy" / "k8s" / "overlays" / "dev")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def dropped_kinds(documents: list[dict[str, Any]]) -> list[str]:
    return sorted({f"{doc['kind']}" for doc in documents if doc["kind"] not in KEPT})


def _secret(name: str, data: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "Opaque",
        "stringData": dict(data),
    }


def playable(
    documents: list[dict[str, Any]],
    *,
    image: str,
    config: Mapping[str, str],
    database_url: str,
    socket: tuple[str, str] | None,
    ports: Mapping[str, int],
    jwks: str,
) -> list[dict[str, Any]]:
    """The documents kube play runs here: `config` overrides the ConfigMap's data, `ports` gives
    each workload (by name) its metrics or API port, `socket` is (host path, container path)."""
    played: list[dict[str, Any]] = []
    secrets: dict[str, dict[str, str]] = {}
    # A ConfigMap a volume names and the overlay leaves to the operator (the API's JWKS).
    config_maps = {doc["metadata"]["name"] for doc in documents if doc["kind"] == "ConfigMap"}
    for original in documents:
        doc = copy.deepcopy(original)
        doc["metadata"].pop("namespace", None)
        if doc["kind"] == "ConfigMap":
            doc["data"] = {**doc.get("data", {}), **config}
            # Each container gets its own port in `env`; podman 4.3 lets envFrom's value win
            # over env's (Kubernetes: env wins), so the shared ports leave the ConfigMap.
            for shared in ("API_PORT", "METRICS_PORT"):
                doc["data"].pop(shared, None)
            played.append(doc)
            continue
        if doc["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        name = doc["metadata"]["name"]
        doc["kind"] = "Deployment"
        for key in ("serviceName", "podManagementPolicy", "volumeClaimTemplates", "strategy"):
            doc["spec"].pop(key, None)
        doc["spec"]["replicas"] = 1
        pod = doc["spec"]["template"]["spec"]
        pod.pop("topologySpreadConstraints", None)
        port = ports[name]
        for container in pod["containers"]:
            _point_container(container, image, port, socket)
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secrets.setdefault(ref["name"], {})[ref["key"]] = database_url
        if socket is not None:
            pod.setdefault("volumes", []).append(
                {"name": "postgres-socket", "hostPath": {"path": socket[0], "type": "Socket"}}
            )
        for volume in pod.get("volumes", []):
            if "configMap" in volume and volume["configMap"]["name"] not in config_maps:
                config_maps.add(volume["configMap"]["name"])
                played.insert(
                    0,
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {"name": volume["configMap"]["name"]},
                        "data": {"jwks.json": jwks},
                    },
                )
        played.append(doc)
    return [_secret(name, data) for name, data in secrets.items()] + played


def _point_container(
    container: dict[str, Any], image: str, port: int, socket: tuple[str, str] | None
) -> None:
    """The local image, its own port (probes included), the PostgreSQL socket mounted.

    The containerPort list goes: on the host's network podman 4.3 refuses any port mapping
    ("PortMappings can only be used with Bridge or slirp4netns networking").
    """
    container["image"] = image
    container["imagePullPolicy"] = "Never"
    variable = "API_PORT" if "api" in container.get("args", []) else "METRICS_PORT"
    container.setdefault("env", []).append({"name": variable, "value": str(port)})
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in container:
            container[probe]["httpGet"]["port"] = port
    container.pop("ports", None)
    if socket is not None:
        container.setdefault("volumeMounts", []).append(
            {"name": "postgres-socket", "mountPath": socket[1]}
        )


def jwks_document() -> tuple[str, str]:
    """(JWKS with one RSA public key, the PEM private key that signs for it)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415
    from jwt.algorithms import RSAAlgorithm  # noqa: PLC0415

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "image-test", "use": "sig", "alg": "RS256"})
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return json.dumps({"keys": [jwk]}), pem
