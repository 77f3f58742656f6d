"""Tools the tests need that are published only as Go modules (promtool, kustomize), built once
with `go install <package>@<pinned version>` into `<cache>/<name>/<version>/<name>`.

Go's modules and build outputs live under `<cache>/go`, shared by every tool and by the Go
example's tests. The binary appears by an atomic rename after a complete build, under a lock: an
interrupted build is never used, and two processes asking at once build once.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llm_usage.core.errors import LocalServiceError
from llm_usage.local.paths import cache_dir, exclusive_lock


class GoMissingError(LocalServiceError):
    """No Go toolchain to build with: the tool cannot be built here."""


@dataclass(frozen=True)
class GoTool:
    """A command built from a pinned Go module."""

    name: str  # the binary `go install` writes
    package: str
    version: str
    install_go: str  # what to install when Go is missing or too old for the module
    version_args: tuple[str, ...] = ("--version",)
    # When set, the built binary's `version_args` must print exactly its version.
    prints_version: bool = False

    def path(self, cache: Path | None = None) -> Path:
        """Where the built binary lives (it may not exist yet)."""
        return (cache or cache_dir()) / self.name / self.version / self.name


def go_environment(cache: Path | None = None) -> dict[str, str]:
    """The environment for `go`: modules and build outputs under the project's cache."""
    go = (cache or cache_dir()) / "go"
    return {
        **os.environ,
        "GOPATH": str(go / "path"),
        "GOMODCACHE": str(go / "mod"),
        "GOCACHE": str(go / "build"),
        # Never fetch a newer toolchain behind the user's back: say which Go is needed instead.
        "GOTOOLCHAIN": "local",
        # Writable module files, so the cache can be deleted with `rm -rf`; no VCS stamping.
        "GOFLAGS": "-modcacherw -buildvcs=false",
        # A static binary, and no C compiler needed.
        "CGO_ENABLED": "0",
    }


def ensure_built(
    tool: GoTool,
    cache: Path | None = None,
    *,
    timeout: float,
    go: str | None = None,
    progress: bool = False,
) -> Path:
    """Return the path of `tool`, building it first with `go` (default: the one on PATH) if it
    is not cached.

    Raises GoMissingError when it must be built and there is no Go, LocalServiceError when the
    build fails or takes longer than `timeout` seconds.
    """
    binary = tool.path(cache)
    if binary.exists():
        return binary
    go = go or shutil.which("go")
    if go is None:
        raise GoMissingError(
            f"`go` is not on PATH: {tool.install_go} to build {tool.name} {tool.version}"
        )
    root = binary.parent
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".lock"):
        if binary.exists():  # another process built it while we waited
            return binary
        if progress:
            sys.stderr.write(
                f"building {tool.name} {tool.version} with {go} (the first time takes minutes)...\n"
            )
            sys.stderr.flush()
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            env = {**go_environment(cache), "GOBIN": str(staging)}
            _run_build(tool, [go, "install", f"{tool.package}@{tool.version}"], env, timeout, root)
            built = staging / tool.name
            if not built.is_file():
                raise LocalServiceError(f"`go install` left no {tool.name} binary in {staging}")
            _check_runs(tool, built)
            built.rename(binary)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return binary


def _run_build(
    tool: GoTool, command: list[str], env: dict[str, str], timeout: float, cwd: Path
) -> None:
    # A session of its own, so a timeout ends the compilers `go` started, not only `go`.
    process = subprocess.Popen(
        command,
        cwd=cwd,  # outside any module: `go install pkg@version` ignores a go.mod here anyway
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    started = time.monotonic()
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise LocalServiceError(
            f"building {tool.name} took longer than {timeout:.0f} s; run `go "
            f"{' '.join(command[1:])}` by hand to see why (GOMODCACHE={env['GOMODCACHE']})"
        ) from None
    if process.returncode != 0:
        raise LocalServiceError(
            f"`go {' '.join(command[1:])}` failed after {time.monotonic() - started:.0f} s: "
            f"{_first_error(output)}; check access to the Go module proxy and the Go version "
            f"({tool.install_go})"
        )


def _check_runs(tool: GoTool, binary: Path) -> None:
    result = subprocess.run(
        [str(binary), *tool.version_args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise LocalServiceError(
            f"the {tool.name} {tool.version} just built does not run: {_first_error(result.stderr)}"
        )
    if tool.prints_version and result.stdout.strip() != tool.version:
        raise LocalServiceError(
            f"the {tool.name} just built says {result.stdout.strip()!r}, not {tool.version}"
        )


def _first_error(output: str) -> str:
    """The line of Go's output that says what went wrong (not the `go: downloading` chatter)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    lines = [line for line in lines if not re.match(r"go: (downloading|finding|extracting)", line)]
    return (lines or ["no output"])[0][:400]


def run_built(name: str, ensure: Callable[[], Path], argv: list[str] | None = None) -> int:
    """`python -m tests.tools.<name> ARGS...`: build the tool if needed, then run it with ARGS;
    a failed build is one line on stderr and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        binary = ensure()
    except LocalServiceError as error:
        sys.stderr.write(f"{name}: error: {error}\n")
        return 2
    return subprocess.run([str(binary), *args], check=False).returncode
