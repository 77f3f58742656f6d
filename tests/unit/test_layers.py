"""Imports flow one way: command line -> workers -> storage and schemas -> core."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

# What each layer may import from the project, besides itself.
ALLOWED = {
    "core": set(),
    "schemas": {"core"},
    "storage": {"core", "schemas"},
    "deploy": {"core"},
    "consumers": {"core", "schemas", "storage"},
    "rollup": {"core", "schemas", "storage"},
}


def project_imports(path: Path) -> set[str]:
    """The first component below `llm_usage` of every project module `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "llm_usage" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_what_is_below_it(layer: str) -> None:
    folder = ROOT / "llm_usage" / layer if layer == "core" else ROOT / layer
    files = sorted(folder.rglob("*.py"))
    assert files, f"no modules found for {layer}"
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported - ALLOWED[layer] - {layer})
        for path in files
        if (imported := project_imports(path)) - ALLOWED[layer] - {layer}
    }
    assert wrong == {}, f"{layer} imports from above it: {wrong}"


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from llm_usage.cli.main import run\nimport llm_usage.consumers.usage\n")
    assert project_imports(module) == {"cli", "consumers"}
