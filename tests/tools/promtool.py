"""`promtool`, built once from the Prometheus Go module, to check and unit-test the alerting rules.

Prometheus publishes no promtool on the package registries this project may use, so it is built
with the Go toolchain (`go install github.com/prometheus/prometheus/cmd/promtool@<pinned>`) into
`<cache>/promtool/<version>/promtool` (`tests.tools.go_build`). The first build downloads ~1.8 GB
of modules and takes ~7-10 minutes on two cores; later calls return the cached binary at once.

    python -m tests.tools.promtool check rules deploy/prometheus/rules/*.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.tools.go_build import GoMissingError, GoTool, ensure_built, run_built

__all__ = [
    "BUILD_TIMEOUT_SECONDS",
    "PROMTOOL_VERSION",
    "GoMissingError",
    "ensure_promtool",
    "main",
    "promtool_path",
]

# The Go module's version (github.com/prometheus/prometheus v0.X.Y is Prometheus 3.X.Y).
PROMTOOL_VERSION = "v0.316.0"
PROMTOOL_PACKAGE = "github.com/prometheus/prometheus/cmd/promtool"
# Generous: a first build on two cores takes 7-10 minutes, most of it downloading modules.
BUILD_TIMEOUT_SECONDS = 40 * 60

_INSTALL_GO = "install Go 1.26.7 or newer (the version its go.mod asks for; https://go.dev/dl)"


def _promtool(version: str) -> GoTool:
    return GoTool(
        name="promtool", package=PROMTOOL_PACKAGE, version=version, install_go=_INSTALL_GO
    )


def promtool_path(cache: Path | None = None, version: str = PROMTOOL_VERSION) -> Path:
    """Where the built binary lives (it may not exist yet)."""
    return _promtool(version).path(cache)


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
    return ensure_built(_promtool(version), cache, timeout=timeout, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.tools.promtool ARGS...`: build promtool if needed, then run it."""
    return run_built("promtool", lambda: ensure_promtool(progress=True), argv)


if __name__ == "__main__":
    sys.exit(main())
