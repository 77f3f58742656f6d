"""An S3-compatible object store for the archive's tests: the Versity S3 Gateway (versitygw),
built once from its Go module and run over a local directory (its `posix` backend).

Why versitygw: it is a real S3 server (SigV4 signing, multipart uploads, ListObjectsV2, ETags,
the AWS error codes), Apache-2.0, and `go install github.com/versity/versitygw/cmd/versitygw@v1.8.0`
builds it with the Go module proxy alone in about a minute (a 60 MB static binary, cached under
`<cache>/versitygw/<version>/`). MinIO's server is AGPL and does not build with `go install`
(replace directives); moto's server is a mock of the API, the last resort.

    python -m tests.tools.versitygw --access K --secret S --port 127.0.0.1:7070 posix /dir
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llm_usage.core.errors import LocalServiceError
from tests.tools.go_build import GoTool, ensure_built, run_built

VERSITYGW_VERSION = "v1.8.0"
VERSITYGW_PACKAGE = "github.com/versity/versitygw/cmd/versitygw"
# A first build downloads ~300 MB of modules and compiles for about a minute on two cores.
BUILD_TIMEOUT_SECONDS = 20 * 60

_TOOL = GoTool(
    name="versitygw",
    package=VERSITYGW_PACKAGE,
    version=VERSITYGW_VERSION,
    install_go="install Go 1.26 or newer (https://go.dev/dl)",
)


def ensure_versitygw(*, progress: bool = False) -> Path:
    """The versitygw binary, built first if it is not cached (LocalServiceError if it cannot)."""
    return ensure_built(_TOOL, timeout=BUILD_TIMEOUT_SECONDS, progress=progress)


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_versitygw(
    data_dir: Path,
    *,
    access_key: str = "archive-test",
    secret_key: str = "archive-test-secret",  # noqa: S107 - a test server's
) -> Iterator[S3Server]:
    """A versitygw on a free loopback port over `data_dir`, stopped on exit."""
    binary = ensure_versitygw()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = (data_dir.parent / "versitygw.log").open("wb")
    process = subprocess.Popen(
        [
            str(binary),
            "--access",
            access_key,
            "--secret",
            secret_key,
            "--port",
            f"127.0.0.1:{port}",
            "--quiet",
            "posix",
            str(data_dir),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ROOT_"))},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise LocalServiceError(
                    f"versitygw exited with {process.returncode}; see {log.name}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise LocalServiceError(f"versitygw did not listen on {port} within 30 s")
            time.sleep(0.05)
        yield S3Server(f"http://127.0.0.1:{port}", access_key, secret_key)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.tools.versitygw ARGS...`: build versitygw if needed, then run it."""
    return run_built("versitygw", lambda: ensure_versitygw(progress=True), argv)


if __name__ == "__main__":
    sys.exit(main())
