"""`kustomize`, built once from its pinned Go module, to render the Kubernetes overlays.

python -m tests.tools.kustomize build deploy/k8s/overlays/prod
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.tools.go_build import GoTool, ensure_built, run_built

KUSTOMIZE = GoTool(
    name="kustomize",
    package="sigs.k8s.io/kustomize/kustomize/v5",
    # v5.8.3 asks for Go 1.27; this is the newest that the machine's Go (1.26) builds.
    version="v5.8.2",
    install_go="install Go 1.26 or newer (https://go.dev/dl)",
    version_args=("version",),
    prints_version=True,
)
# A first build (modules downloaded, then compiled) takes 2-4 minutes on two cores.
BUILD_TIMEOUT_SECONDS = 20 * 60


def go_command() -> str | None:
    """`go` on PATH, else where the official archive installs it."""
    found = shutil.which("go")
    if found is None and Path("/usr/local/go/bin/go").is_file():
        found = "/usr/local/go/bin/go"
    return found


def ensure_kustomize(cache: Path | None = None, *, progress: bool = False) -> Path:
    """Return the path of the pinned kustomize, building it first if it is not cached.

    Raises GoMissingError without Go, LocalServiceError when the build fails or takes too long.
    """
    return ensure_built(
        KUSTOMIZE, cache, timeout=BUILD_TIMEOUT_SECONDS, go=go_command(), progress=progress
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.tools.kustomize ARGS...`: build kustomize if needed, then run it."""
    return run_built("kustomize", lambda: ensure_kustomize(progress=True), argv)


if __name__ == "__main__":
    sys.exit(main())
