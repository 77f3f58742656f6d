"""Imports flow one way: command line -> workers -> runtime, storage, Kafka, schemas -> domain
-> core, and nothing in the product imports the harnesses (bench, soak, testing).

Every module of every package and sub-package under `llm_usage/` is read; an import is judged
by its full dotted name, so a rule can name a sub-package (the watcher never imports the handler).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "llm_usage"

_BELOW_WORKERS = {"core", "domain", "schemas", "storage", "kafka", "runtime"}
_PRODUCT = _BELOW_WORKERS | {"consumers", "rollup", "api", "local", "cli", "archive"}

# What each top-level package may import from the project, besides itself.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "domain": {"core"},
    "schemas": {"core", "domain"},
    "storage": {"core", "domain", "schemas"},
    "kafka": {"core", "domain", "schemas"},
    # Verified Parquet archives of a month of events: `cli` drives them.
    "archive": {"core", "domain", "schemas", "storage"},
    "runtime": {"core", "domain", "schemas", "storage", "kafka"},
    "consumers": _BELOW_WORKERS,
    "rollup": _BELOW_WORKERS,
    "api": _BELOW_WORKERS - {"runtime"},
    "local": {"core", "domain", "schemas", "storage", "kafka"},
    "cli": _PRODUCT,
    # The harnesses: the shared helpers serve the two others and the tests.
    "testing": _PRODUCT - {"cli"},
    "bench": _PRODUCT | {"testing"},
    "soak": _PRODUCT | {"testing"},
    "__main__": {"cli"},
}

# Imports a package's rule allows but one of its parts must not make: (importer, imported),
# each a dotted prefix below `llm_usage`.
FORBIDDEN: list[tuple[str, str]] = [
    ("consumers.usage", "consumers.budget"),
    ("consumers.budget", "consumers.usage"),
    # Handler and watcher are two shells around the same decisions (consumers/budget/alerts.py).
    ("consumers.budget.watcher", "consumers.budget.handler"),
    ("consumers.budget.handler", "consumers.budget.watcher"),
    # A command group of the harnesses registers itself through the CLI's shared argument types
    # only; the entry point imports no group back.
    ("bench", "cli.main"),
    ("soak", "cli.main"),
    ("bench", "soak"),
    ("soak", "bench"),
]


def module_name(path: Path) -> str:
    """`llm_usage/consumers/budget/relay.py` -> `consumers.budget.relay`."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> set[str]:
    """The dotted name below `llm_usage` of every project module `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
            if node.module == "llm_usage":
                names = [f"llm_usage.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "llm_usage" and len(parts) > 1:
                found.add(".".join(parts[1:]))
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def wrong_imports(module: str, imported: set[str]) -> list[str]:
    """What `module` (a dotted name below `llm_usage`) must not import, with the rule broken."""
    package = module.split(".", maxsplit=1)[0]
    allowed = ALLOWED[package] | {package}
    wrong = [
        f"{name} (not below {package})" for name in imported if name.split(".")[0] not in allowed
    ]
    wrong += [
        f"{name} ({importer} must not import {target})"
        for name in imported
        for importer, target in FORBIDDEN
        if _within(module, importer) and _within(name, target)
    ]
    return sorted(wrong)


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_has_a_rule() -> None:
    packages = {module_name(path).split(".")[0] for path in _modules() if module_name(path)}
    assert packages == set(ALLOWED), f"packages without a rule: {packages - set(ALLOWED)}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_is_below_it(package: str) -> None:
    files = [path for path in _modules() if module_name(path).split(".")[0] == package]
    assert files, f"no modules found for {package}"
    wrong = {
        module_name(path): found
        for path in files
        if (found := wrong_imports(module_name(path), project_imports(path)))
    }
    assert wrong == {}, f"{package} imports against the layering: {wrong}"


def test_the_package_holds_no_symbolic_link() -> None:
    links = [str(path.relative_to(ROOT)) for path in PACKAGE.rglob("*") if path.is_symlink()]
    assert links == []


def test_the_customers_top_level_folders_lead_into_the_package() -> None:
    for name in ("consumers", "schemas", "storage", "rollup"):
        assert (ROOT / name).resolve() == (PACKAGE / name).resolve(), name


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("core.clock", "from llm_usage.domain.money import round_usd"),
        ("domain.periods", "import llm_usage.storage.pool"),
        ("schemas.usage_event", "from llm_usage.storage import usage_events"),
        ("storage.pool", "from llm_usage.kafka.clients import build_producer"),
        ("kafka.topics", "from llm_usage.runtime.retry import is_transient"),
        ("runtime.loop", "from llm_usage.consumers.usage.consumer import spec"),
        ("consumers.usage.consumer", "from llm_usage.consumers.budget.handler import X"),
        ("consumers.budget.watcher", "from llm_usage.consumers.budget.handler import X"),
        ("consumers.budget.relay", "from llm_usage.cli.main import main"),
        ("rollup.run", "from llm_usage.consumers.budget.alerts import alert_for"),
        ("api.app", "from llm_usage.runtime.loop import BatchConsumer"),
        ("api.app", "from llm_usage.rollup.run import run_rollup"),
        ("cli.main", "from llm_usage.bench.ingest import run"),
        ("storage.usage_events", "from llm_usage.local.sample_events import sample"),
        ("soak.run", "from llm_usage.bench.support import free_port"),
        ("bench.cli", "from llm_usage.cli.main import main"),
        ("core.settings", "from llm_usage import runtime"),
    ],
)
def test_the_check_sees_each_kind_of_wrong_import(tmp_path: Path, module: str, source: str) -> None:
    path = tmp_path / "m.py"
    path.write_text(source + "\n")
    assert wrong_imports(module, project_imports(path)) != []


def test_the_check_lets_a_right_import_through(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text("from llm_usage.storage.pool import create_pool\nimport llm_usage.core.logs\n")
    assert wrong_imports("rollup.run", project_imports(path)) == []
