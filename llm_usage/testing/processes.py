"""Workers as their own processes, as ops run them: `python -m llm_usage …` started with an
environment of the harness's choosing, a free port for its probes, and plain HTTP to ask them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from llm_usage.core.errors import UserFacingError

READY_WITHIN_SECONDS = 90.0
# A worker drains within 30 s of SIGTERM (docs/operations.md); one still running later is killed.
STOP_WITHIN_SECONDS = 40.0


class WorkerNotReadyError(UserFacingError):
    """A worker process exited, or did not answer its probe, before it was ready."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the child binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def http_get(url: str, *, timeout: float = 2.0) -> tuple[int, str]:
    """Status and body; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - our probe
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


def llm_usage_command(*args: str, profile: Path | None = None) -> list[str]:
    """`python -m llm_usage ARGS` with this interpreter; under pyinstrument (dev extra) writing
    `profile` when given, as HTML for a `.html` name and as text otherwise."""
    command = [sys.executable, "-m", "llm_usage", *args]
    if profile is None:
        return command
    renderer = "html" if profile.suffix == ".html" else "text"
    return [sys.executable, "-m", "pyinstrument", "-r", renderer, "-o", str(profile), *command[1:]]


async def spawn_llm_usage(
    *args: str,
    env: Mapping[str, str],
    log_path: Path | None = None,
    profile: Path | None = None,
) -> asyncio.subprocess.Process:
    """Start `python -m llm_usage ARGS` with exactly `env`, stdin closed. Its stdout and stderr
    are appended to `log_path`; without one, stdout is discarded and stderr is a pipe to read."""
    command = llm_usage_command(*args, profile=profile)
    if log_path is None:
        return await asyncio.create_subprocess_exec(
            *command,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    with log_path.open("ab") as log_file:
        return await asyncio.create_subprocess_exec(
            *command,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )


async def stop_process(
    process: asyncio.subprocess.Process, *, within_seconds: float = STOP_WITHIN_SECONDS
) -> int:
    """SIGTERM, then its exit code; killed (and -9) if it has not exited within the time."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), within_seconds)
        except TimeoutError:
            process.kill()
    return await process.wait()


@dataclass
class WorkerProcess:
    """A `python -m llm_usage …` process logging to a file, and the port of its probes."""

    name: str  # for messages: "the usage consumer", or the command line
    process: asyncio.subprocess.Process
    probe_port: int
    log_path: Path
    ready_at: float = 0.0  # perf_counter() when its probe first answered 200

    @classmethod
    async def start(
        cls,
        *args: str,
        env: Mapping[str, str],
        probe_port: int,
        log_path: Path,
        name: str | None = None,
        profile: Path | None = None,
    ) -> Self:
        """`python -m llm_usage ARGS` with `env` and METRICS_PORT=`probe_port`, its output
        appended to `log_path`."""
        process = await spawn_llm_usage(
            *args, env={**env, "METRICS_PORT": str(probe_port)}, log_path=log_path, profile=profile
        )
        return cls(name or f"`llm-usage {' '.join(args)}`", process, probe_port, log_path)

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls,
        *args: str,
        env: Mapping[str, str],
        log_prefix: str,
        name: str | None = None,
        profile: Path | None = None,
        ready_path: str = "/readyz",
        ready_within: float = READY_WITHIN_SECONDS,
        ready_poll: float = 0.2,
        stop_within: float = STOP_WITHIN_SECONDS,
    ) -> AsyncIterator[Self]:
        """Start the worker on a free port, logging to a new file that is kept; yield it once
        `ready_path` answers 200; stop it (SIGTERM, then SIGKILL) if it still runs at the end."""
        log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - outlives this block on purpose
            prefix=log_prefix, suffix=".log", delete=False
        )
        log_file.close()
        worker = await cls.start(
            *args,
            env=env,
            probe_port=free_port(),
            log_path=Path(log_file.name),
            name=name,
            profile=profile,
        )
        try:
            await worker.wait_until_ready(path=ready_path, within=ready_within, poll=ready_poll)
            yield worker
        finally:
            if worker.alive:
                await worker.stop(within_seconds=stop_within)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def get(self, path: str) -> tuple[int, str]:
        """GET `path` from the worker's probe server (status 0 if nothing answered)."""
        return await asyncio.to_thread(http_get, f"http://127.0.0.1:{self.probe_port}{path}")

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_until_ready(
        self, *, path: str = "/readyz", within: float = READY_WITHIN_SECONDS, poll: float = 0.2
    ) -> None:
        """Poll `path` every `poll` seconds until it answers 200 (a consumer's /readyz: it joined
        its group); set `ready_at`. WorkerNotReadyError if it exits or `within` passes first."""
        deadline = time.monotonic() + within
        while True:
            if self.process.returncode is not None:
                raise WorkerNotReadyError(
                    f"{self.name} exited with {self.process.returncode} before it was ready; "
                    f"its log ({self.log_path}) ends with:\n{self.log_tail()}"
                )
            status, _ = await self.get(path)
            if status == 200:
                self.ready_at = time.perf_counter()
                return
            if time.monotonic() > deadline:
                raise WorkerNotReadyError(
                    f"{self.name} was not ready within {within:.0f} s (log: {self.log_path})"
                )
            await asyncio.sleep(poll)

    async def stop(self, *, within_seconds: float = STOP_WITHIN_SECONDS) -> int:
        """SIGTERM, then its exit code (killed, and -9, if it did not stop in time)."""
        return await stop_process(self.process, within_seconds=within_seconds)
