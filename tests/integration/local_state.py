"""Helpers for tests that run `llm-usage dev …` / `demo` as people do, in a state dir of their own.

The state dir (`LLM_USAGE_STATE_DIR`) is a fresh one per test, so a developer's own `dev up` is
never touched; the Kafka jars stay in the usual cache, so nothing is downloaded again.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# Variables that would make `demo` skip the local services, or point `dev` elsewhere.
_OUTSIDE = ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "LLM_USAGE_STATE_DIR")


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


@dataclass(frozen=True)
class LocalState:
    """A private state dir, and how to run the `llm-usage` command against it."""

    path: Path

    @property
    def record(self) -> Path:
        return self.path / "dev.json"

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """This process's environment, minus what points elsewhere, plus this state dir."""
        env = {key: value for key, value in os.environ.items() if key not in _OUTSIDE}
        return {**env, "LLM_USAGE_STATE_DIR": str(self.path), **(extra or {})}

    def run(
        self, *arguments: str, env: Mapping[str, str] | None = None, timeout: float = 120
    ) -> Finished:
        """`llm-usage <arguments>` in a process of its own; `env` adds to its environment."""
        return self._run(["-m", "llm_usage", *arguments], env, timeout)

    def python(
        self, code: str, *, env: Mapping[str, str] | None = None, timeout: float = 120
    ) -> Finished:
        """`python -c <code>` in a process of its own; `env` adds to its environment."""
        return self._run(["-c", code], env, timeout)

    def _run(
        self, arguments: list[str], extra: Mapping[str, str] | None, timeout: float
    ) -> Finished:
        result = subprocess.run(
            [sys.executable, *arguments],
            env=self.environment(extra),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Finished(result.returncode, result.stdout, result.stderr)

    def processes(self) -> dict[int, str]:
        """Live processes whose command line names this state dir (its JVMs, its PostgreSQL)."""
        return processes_naming(str(self.path))


def processes_naming(marker: str) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if marker in command and state != "Z":
            found[int(entry.name)] = command
    return found


@contextlib.contextmanager
def local_state() -> Iterator[LocalState]:
    """A fresh state dir; afterwards `dev down` in it, and whatever still names it is ended.

    Under the temp dir, open to all (0755): as root the PostgreSQL server runs as its own user.
    """
    path = Path(tempfile.mkdtemp(prefix="llm-usage-test-state-", dir=tempfile.gettempdir()))
    path.chmod(0o755)
    state = LocalState(path)
    try:
        yield state
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            state.run("dev", "down", timeout=60)
        # Only processes that name this test's own, unique directory: nobody else's.
        for pid in state.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def occupied(port: int) -> Iterator[bool]:
    """Hold `port` on 127.0.0.1 with a listening socket, as another server would.

    Yields True if this test holds it, False if something else already did (taken either way).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            listener.bind(("127.0.0.1", port))
            listener.listen()
        except OSError:
            yield False
        else:
            yield True
    finally:
        listener.close()


def port_is_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def exports(text: str) -> dict[str, str]:
    """`export NAME=value` lines (as `dev env` prints them, shell-quoted) as a mapping."""
    found = {}
    for line in text.splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            found[name] = shlex.split(value)[0]
    return found


def wait_until_gone(state: LocalState, timeout: float = 10) -> dict[int, str]:
    """The processes naming `state` still alive after up to `timeout` s (none, normally)."""
    deadline = time.monotonic() + timeout
    while (left := state.processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
