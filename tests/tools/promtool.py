"""`promtool`, built once from the Prometheus Go module, to check and unit-test the alerting rules.

Prometheus publishes no promtool on the package registries this project may use, so it is built
with the Go toolchain (`go install github.com/prometheus/prometheus/cmd/promtool@<pinned>`) into
`<cache>/promtool/<version>/promtool`. Go's modules and build outputs live under `<cache>/go`, the
same directories the Go example's tests use. The first build downloads ~1.8 GB of modules and
takes ~7-10 minutes on two cores; later calls return the cached binary at once.

The binary appears by an atomic rename after a complete build, under a lock: an interrupted build
is never used, and two processes asking at once build once.

    python -m tests.tools.promtool check rules deploy/prometheus/rules/*.yaml
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
from pathlib import Path

from llm_usage.core.errors import LocalServiceError
from llm_usage.local.paths import cache_dir, exclusive_lock

# The Go module's version (github.com/prometheus/prometheus v0.X.Y is Prometheus 3.X.Y).
PROMTOOL_VERSION = "v0.316.0"
PROMTOOL_PACKAGE = "github.com/prometheus/prometheus/cmd/promtool"
# Generous: a first build on two cores takes 7-10 minutes, most of it downloading modules.
BUILD_TIMEOUT_SECONDS = 40 * 60

_INSTALL_GO = "install Go 1.26.7 or newer (the version its go.mod asks for; https://go.dev/dl)"


class GoMissingError(LocalServiceError):
    """No Go toolchain on PATH: promtool cannot be built here."""


def promtool_path(cache: Path | None = None, version: str = PROMTOOL_VERSION) -> Path:
    """Where the built binary lives (it may not exist yet)."""
    return (cache or cache_dir()) / "promtool" / version / "promtool"


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


def ensure_promtool(
    cache: Path | None = None,
    *,
    version: str = PROMTOOL_VERSION,
    timeout: float = BUILD_TIMEOUT_SECONDS,
    progress: bool = False,
) -> Path:
    """Return the path of promtool `version`, building it first if it is not cached.

    Raises GoMissingError when it must be built and `go` is not on PATH, LocalServiceError when
    the build fails or takes longer than `timeout` seconds.
    """
    binary = promtool_path(cache, version)
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        raise GoMissingError(f"`go` is not on PATH: {_INSTALL_GO} to build promtool {version}")
    root = binary.parent
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".lock"):
        if binary.exists():  # another process built it while we waited
            return binary
        if progress:
            sys.stderr.write(
                f"building promtool {version} with {go} (the first time takes ~10 minutes)...\n"
            )
            sys.stderr.flush()
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            env = {**go_environment(cache), "GOBIN": str(staging)}
            _run_build([go, "install", f"{PROMTOOL_PACKAGE}@{version}"], env, timeout, root)
            built = staging / "promtool"
            if not built.is_file():
                raise LocalServiceError(f"`go install` left no promtool binary in {staging}")
            _check_runs(built, version)
            built.rename(binary)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return binary


def _run_build(command: list[str], env: dict[str, str], timeout: float, cwd: Path) -> None:
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
            f"building promtool took longer than {timeout:.0f} s; run `go "
            f"{' '.join(command[1:])}` by hand to see why (GOMODCACHE={env['GOMODCACHE']})"
        ) from None
    if process.returncode != 0:
        raise LocalServiceError(
            f"`go {' '.join(command[1:])}` failed after {time.monotonic() - started:.0f} s: "
            f"{_first_error(output)}; check access to the Go module proxy and the Go version "
            f"({_INSTALL_GO})"
        )


def _check_runs(binary: Path, version: str) -> None:
    result = subprocess.run(
        [str(binary), "--version"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise LocalServiceError(
            f"the promtool {version} just built does not run: {_first_error(result.stderr)}"
        )


def _first_error(output: str) -> str:
    """The line of Go's output that says what went wrong (not the `go: downloading` chatter)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    lines = [line for line in lines if not re.match(r"go: (downloading|finding|extracting)", line)]
    return (lines or ["no output"])[0][:400]


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.tools.promtool ARGS...`: build promtool if needed, then run it."""
    args = sys.argv[1:] if argv is None else argv
    try:
        binary = ensure_promtool(progress=True)
    except LocalServiceError as error:
        sys.stderr.write(f"promtool: error: {error}\n")
        return 2
    return subprocess.run([str(binary), *args], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
