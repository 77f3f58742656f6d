"""Containers on this machine: podman from Debian, a Python base image made from Debian's
packages, and the project's image built from deploy/Dockerfile on it.

No Docker daemon and no image registry are reachable here, so:
- podman, runc, mmdebstrap and catatonit are installed from Debian when missing and we are root;
  `/etc/containers/containers.conf` gets the settings this host needs (cgroupfs, no default
  ulimits: podman's nofile/nproc defaults are refused here; runc: crun refuses the hybrid
  cgroups);
- the base is `mmdebstrap --variant=minbase` of Debian bookworm with its python3 (3.11, the
  lock's Python) and this machine's extra CA certificates (pip inside the build reaches the
  package registry through them; `PIP_CERT` points at the bundle), imported with `podman import`.
  Its tarball is cached outside the repository (~/.cache/llm-usage-pipeline/images/), keyed by
  what goes into it;
- the project's image is `podman build --network=host` of deploy/Dockerfile with the base as its
  `PYTHON_IMAGE` build argument (a registry's python:3.11-slim works elsewhere unchanged).

    python -m tests.tools.containers image      # build (or reuse) the base, build the image
    python -m tests.tools.containers base       # the base alone
    IMAGE_BASE=python:3.11-slim-trixie make image   # a registry's base instead
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
IMAGE = "localhost/llm-usage-pipeline:local"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-usage-pipeline"

PACKAGES = ("podman", "runc", "mmdebstrap", "uidmap", "catatonit", "fuse-overlayfs")
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
CONTAINERS_CONF_TEXT = """\
# Written by llm-usage-pipeline's tests/tools/containers.py for this host: cgroups v1 without
# systemd (cgroupfs, file events), no default ulimits (setrlimit of podman's defaults is refused).
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
"""
# Debian bookworm ships Python 3.11, the Python requirements/*.lock are compiled for.
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
EXTRA_CAS = Path("/usr/local/share/ca-certificates")


def say(line: str) -> None:
    sys.stderr.write(line + "\n")


class ContainersUnavailableError(RuntimeError):
    """podman cannot run containers here; the message says why."""


def run(
    command: list[str], *, timeout: float = 1800, capture: bool = True
) -> subprocess.CompletedProcess[str]:
    """`command`, failing with its own output when it fails."""
    result = subprocess.run(
        command, capture_output=capture, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        output = (result.stderr or "") + (result.stdout or "") if capture else ""
        raise ContainersUnavailableError(
            f"`{' '.join(command[:4])} ...` exited {result.returncode}: {output.strip()[-2000:]}"
        )
    return result


def podman(*arguments: str, timeout: float = 1800, capture: bool = True) -> str:
    """podman with runc (crun refuses this host's hybrid cgroups)."""
    return run(["podman", "--runtime", "runc", *arguments], timeout=timeout, capture=capture).stdout


def ensure_podman() -> None:
    """podman and its configuration, installed from Debian when missing and we are root."""
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        if os.geteuid() != 0:
            raise ContainersUnavailableError(
                f"{', '.join(missing)} not installed and not root: apt-get install "
                + " ".join(PACKAGES)
            )
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES])
    if not CONTAINERS_CONF.exists():
        if os.geteuid() != 0:
            raise ContainersUnavailableError(
                f"{CONTAINERS_CONF} is missing and not root; it needs:\n{CONTAINERS_CONF_TEXT}"
            )
        CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
        CONTAINERS_CONF.write_text(CONTAINERS_CONF_TEXT)


def _extra_cas() -> list[Path]:
    return sorted(EXTRA_CAS.glob("*.crt"))


def base_tag() -> str:
    """The base image's name: what goes into it (suite, packages, extra CAs) decides its tag."""
    digest = hashlib.sha256(f"{SUITE} {' '.join(BASE_PACKAGES)}".encode())
    for ca in _extra_cas():
        digest.update(ca.read_bytes())
    return f"localhost/llm-usage-base:{SUITE}-{digest.hexdigest()[:12]}"


def image_exists(tag: str) -> bool:
    return (
        subprocess.run(
            ["podman", "image", "exists", tag], capture_output=True, timeout=60, check=False
        ).returncode
        == 0
    )


def ensure_base() -> str:
    """The base image's tag, imported from the cached tarball, made by mmdebstrap if missing."""
    ensure_podman()
    tag = base_tag()
    if image_exists(tag):
        return tag
    tarball = CACHE / "images" / f"{tag.rpartition(':')[2]}.tar"
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        # mmdebstrap picks the format from the name: a tarball.
        partial = tarball.with_name(f"{tarball.stem}.partial.tar")
        started = time.monotonic()
        run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                # pip inside the build trusts what this machine trusts (a TLS-inspecting egress).
                "--customize-hook=cp /usr/local/share/ca-certificates/*.crt "
                '"$1/usr/local/share/ca-certificates/" 2>/dev/null || true',
                '--customize-hook=chroot "$1" update-ca-certificates >/dev/null',
                # Nothing the image needs: apt's lists and the docs.
                '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/usr/share/doc/*',
                SUITE,
                str(partial),
            ]
        )
        partial.rename(tarball)
        say(f"base: mmdebstrap took {time.monotonic() - started:.0f} s")
    podman(
        "import",
        "--change",
        "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
        "--change",
        "ENV LANG=C.UTF-8",
        "--change",
        'CMD ["python3"]',
        str(tarball),
        tag,
    )
    return tag


def build_image(tag: str = IMAGE) -> str:
    """deploy/Dockerfile built on the base; podman's layer cache makes a second build quick.

    IMAGE_BASE names another base (a registry's python:3.11-slim-trixie where one is reachable).
    """
    ensure_podman()
    base = os.environ.get("IMAGE_BASE") or ensure_base()
    podman(
        "build",
        "--network=host",
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "--file",
        str(DOCKERFILE),
        "--tag",
        tag,
        str(ROOT),
        capture=False,
    )
    return tag


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "image"
    try:
        if what == "base":
            sys.stdout.write(ensure_base() + "\n")
        elif what == "image":
            started = time.monotonic()
            sys.stdout.write(build_image() + "\n")
            say(f"image: built in {time.monotonic() - started:.0f} s")
        else:
            say(f"usage: python -m tests.tools.containers [base|image], not {what}")
            return 2
    except ContainersUnavailableError as error:
        say(f"containers: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
