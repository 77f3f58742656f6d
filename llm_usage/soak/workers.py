"""The soak's workers: each replica its own `python -m llm_usage` process, as ops run them, kept
running by a supervisor that restarts what exits (as a pod's restart policy would)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from llm_usage.testing.processes import free_port, http_get, spawn_llm_usage

log = structlog.get_logger(__name__)

COMMANDS = {
    "usage": ("consume", "usage"),
    "budget": ("consume", "budget"),
    "rollup": ("rollup", "schedule"),
}
_RESTART_AFTER_UNPLANNED_EXIT = 2.0


@dataclass(frozen=True)
class WorkerExit:
    """A worker process ended: when (Unix time), how, and whether the soak caused it."""

    at: float
    worker: str
    returncode: int
    planned: bool


@dataclass
class Worker:
    name: str  # e.g. "usage-1"
    argv: tuple[str, ...]
    log_path: Path
    probe_port: int
    process: asyncio.subprocess.Process | None = None
    # Set by a fault: the exit it causes is planned, and the restart waits until this time.
    planned_exit: bool = False
    restart_at: float = 0.0
    paused: bool = False
    starts: int = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def log_tail(self, lines: int = 10) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class WorkerFleet:
    """Two replicas of each worker; `environment` reaches every process (settings, the clock)."""

    directory: Path
    environment: Mapping[str, str]
    replicas: int = 2
    workers: dict[str, Worker] = field(default_factory=dict)
    exits: list[WorkerExit] = field(default_factory=list)
    on_exit: Callable[[WorkerExit], None] | None = None
    _supervisors: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: bool = False

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for kind, argv in COMMANDS.items():
            for replica in range(1, self.replicas + 1):
                name = f"{kind}-{replica}"
                self.workers[name] = Worker(
                    name=name,
                    argv=argv,
                    log_path=self.directory / f"{name}.log",
                    probe_port=free_port(),
                )
        for worker in self.workers.values():
            await self._spawn(worker)
            self._supervisors.append(asyncio.create_task(self._supervise(worker)))

    async def wait_until_ready(self, *, within: float) -> None:
        """Every consumer answers /readyz 200 (it joined its group); every scheduler /healthz."""
        deadline = time.monotonic() + within
        pending = set(self.workers)
        while pending:
            for name in sorted(pending):
                worker = self.workers[name]
                path = "/healthz" if name.startswith("rollup") else "/readyz"
                status, _ = await asyncio.to_thread(
                    http_get, f"http://127.0.0.1:{worker.probe_port}{path}"
                )
                if status == 200:
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                name = sorted(pending)[0]
                raise RuntimeError(
                    f"{', '.join(sorted(pending))} not ready within {within:.0f} s; "
                    f"{name}'s log ends with:\n{self.workers[name].log_tail()}"
                )
            await asyncio.sleep(0.5)

    def signal(self, name: str, signum: signal.Signals, *, restart_after: float = 0.0) -> bool:
        """Send `signum`; for SIGKILL/SIGTERM the worker's exit is planned and it is started
        again `restart_after` seconds after it exits. False if it was not running."""
        worker = self.workers[name]
        if not worker.running or worker.process is None:
            return False
        if signum in (signal.SIGKILL, signal.SIGTERM):
            worker.planned_exit = True
            worker.restart_at = restart_after
        worker.process.send_signal(signum)
        if signum is signal.SIGKILL and worker.paused:
            worker.paused = False
        return True

    async def pause(self, name: str, seconds: float) -> bool:
        """SIGSTOP, wait, SIGCONT: the process keeps its connections but says nothing."""
        worker = self.workers[name]
        if not worker.running or worker.process is None or worker.paused:
            return False
        worker.paused = True
        worker.process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            if worker.running and worker.process is not None:
                worker.process.send_signal(signal.SIGCONT)
            worker.paused = False
        return True

    async def stop(self, *, within: float = 60.0) -> dict[str, int | None]:
        """SIGTERM every worker and wait for it; what is left after `within` is killed."""
        self._stopping = True
        for supervisor in self._supervisors:
            supervisor.cancel()
        for supervisor in self._supervisors:
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        running = [w for w in self.workers.values() if w.running and w.process is not None]
        for worker in running:
            assert worker.process is not None
            worker.process.send_signal(signal.SIGCONT)
            worker.process.send_signal(signal.SIGTERM)
        for worker in running:
            assert worker.process is not None
            try:
                await asyncio.wait_for(worker.process.wait(), within)
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
        return {
            name: worker.process.returncode if worker.process else None
            for name, worker in self.workers.items()
        }

    async def _spawn(self, worker: Worker) -> None:
        worker.process = await spawn_llm_usage(
            *worker.argv,
            env={
                **os.environ,
                **self.environment,
                "METRICS_PORT": str(worker.probe_port),
                # A stable identity per replica, as a StatefulSet pod's name: restarted, it takes
                # its partitions back without a rebalance (static membership).
                "KAFKA_GROUP_INSTANCE_ID": worker.name,
            },
            log_path=worker.log_path,
        )
        worker.starts += 1

    async def _supervise(self, worker: Worker) -> None:
        while not self._stopping:
            assert worker.process is not None
            returncode = await worker.process.wait()
            if self._stopping:
                return
            ended = WorkerExit(
                at=time.time(),
                worker=worker.name,
                returncode=returncode,
                planned=worker.planned_exit,
            )
            self.exits.append(ended)
            if self.on_exit is not None:
                self.on_exit(ended)
            if not worker.planned_exit:
                log.warning(
                    "A soak worker exited on its own.",
                    worker=worker.name,
                    returncode=returncode,
                    log_tail=worker.log_tail(),
                )
            delay = worker.restart_at if worker.planned_exit else _RESTART_AFTER_UNPLANNED_EXIT
            worker.planned_exit, worker.restart_at, worker.paused = False, 0.0, False
            await asyncio.sleep(delay)
            if not self._stopping:
                await self._spawn(worker)
