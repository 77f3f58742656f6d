"""The deploy folder, and what every artifact in it is held to: the commands and settings it
hands to `llm-usage` must be ones the CLI accepts, and the drain and retention times the
workers are built for."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from llm_usage.cli.main import build_parser
from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_FILE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
SCHEMAS = DEPLOY / "schemas"

Object = dict[str, Any]

# A consumer exits within 30 s of SIGTERM (docs/operations.md); SIGKILL must come later than that.
DRAIN_SECONDS = 30
GRACE_MARGIN_SECONDS = 10
# The usage topic keeps at least this long: the outage the pipeline is planned to outlast.
MIN_USAGE_RETENTION_HOURS = 7 * 24
# The budget consumer forgets counted ids this long after the usage topic forgets the events.
DEDUP_MARGIN_HOURS = 24
SECRET_VARIABLES = ("DATABASE_URL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD")


@cache
def schema(name: str) -> Any:
    """A JSON Schema kept in deploy/schemas (see its README for where each came from)."""
    return json.loads((SCHEMAS / name).read_text())


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


def closed_schema(node: Any) -> Any:
    """A CRD schema that refuses unknown fields, as `kubectl apply --validate=strict` does."""
    if isinstance(node, list):
        return [closed_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    closed = {key: closed_schema(value) for key, value in node.items()}
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed
