"""Pieces every `llm-usage bench` command shares: a database of its own, a backlog published
before the clock starts, a consumer timed from its first fetch to its last commit in this process,
or run as its own process and watched through /proc."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from prometheus_client import CollectorRegistry

from llm_usage.core.errors import UserFacingError
from llm_usage.core.settings import Settings
from llm_usage.kafka.clients import new_producer, start_client
from llm_usage.runtime.spec import ConsumerSpec
from llm_usage.runtime.worker import run_consumer


@dataclass(frozen=True)
class Measurement:
    name: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


@dataclass(frozen=True)
class TimedRun:
    """A consumer's busy time (first fetch to last commit) and its process's CPU for the run."""

    seconds: float
    cpu_seconds: float


async def bench_database(database_url: str, name: str) -> str:
    """A database of its own on the same server, so a benchmark never touches real usage."""
    parts = urlsplit(database_url)
    bench_url = urlunsplit(parts._replace(path=f"/{name}"))
    connection = await asyncpg.connect(database_url)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return bench_url


async def publish_backlog(
    settings: Settings, topic: str, records: Sequence[tuple[bytes, bytes]]
) -> float:
    """Publish (key, value) records as fast as the producer goes; return the seconds it took."""
    producer = new_producer(settings, linger_ms=20, max_batch_size=256 * 1024)
    await start_client(producer, settings)
    started = time.perf_counter()
    try:
        sent = [await producer.send(topic, key=key, value=value) for key, value in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return time.perf_counter() - started


def freeze_harness_objects() -> None:
    """The harness holds every event for its checks; a real consumer process holds one batch.
    Freezing them keeps the garbage collector from rescanning them while a consumer is timed."""
    gc.collect()
    gc.freeze()


async def time_consumer(settings: Settings, spec: ConsumerSpec) -> TimedRun:
    """Run `spec` in this process until it has been idle for a second; time its busy part."""
    cpu_before = time.process_time()
    consumer = await run_consumer(settings, spec, exit_when_idle=1.0, registry=CollectorRegistry())
    if consumer.first_fetch_at is None or consumer.last_commit_at is None:
        raise AssertionError(f"the {spec.name} consumer fetched nothing from {spec.topic}")
    return TimedRun(
        seconds=consumer.last_commit_at - consumer.first_fetch_at,
        cpu_seconds=time.process_time() - cpu_before,
    )


# ---------------------------------------------------------------------------------------------
# A consumer as its own process (`python -m llm_usage consume <worker>`, as ops run it), and
# what Linux's /proc says about it: CPU time (utime + stime, all threads) and resident memory.

_KIB = 1024


@dataclass(frozen=True)
class ProcessMemory:
    rss_bytes: int  # VmRSS: resident now
    peak_bytes: int  # VmHWM: the most it was ever resident (the kernel's high-water mark)


def cpu_seconds_from_stat(stat: str, clock_ticks: int) -> float:
    """User + system CPU seconds from the text of /proc/<pid>/stat (threads included).

    The command name (field 2) is in parentheses and may hold spaces or parentheses itself, so
    the fields are counted from the last ')': utime and stime are fields 14 and 15.
    """
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / clock_ticks


def memory_from_status(status: str) -> ProcessMemory:
    """VmRSS and VmHWM from the text of /proc/<pid>/status, in bytes."""
    values: dict[str, int] = {}
    for line in status.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            amount, unit = rest.split()
            if unit != "kB":
                raise ValueError(f"unexpected unit {unit!r} for {name}")
            values[name] = int(amount) * _KIB
    if len(values) != 2:
        raise ValueError("no VmRSS/VmHWM lines (a kernel thread, or a process that exited?)")
    return ProcessMemory(rss_bytes=values["VmRSS"], peak_bytes=values["VmHWM"])


def busy_cpu_seconds_from_stat(stat: str, clock_ticks: int) -> float:
    """CPU seconds the whole machine spent working, all cores, from the text of /proc/stat.

    Its first line sums every core: user, nice, system, idle, iowait, irq, softirq, steal, ...
    Busy is user + nice + system + irq + softirq; idle and iowait are not work, and steal is
    time the hypervisor gave to someone else (guest time is already inside user).
    """
    label, *ticks = stat.split("\n", 1)[0].split()
    if label != "cpu" or len(ticks) < 8:
        raise ValueError(f"not the summed cpu line of /proc/stat: {stat[:60]!r}")
    user, nice, system, _idle, _iowait, irq, softirq = (int(t) for t in ticks[:7])
    return (user + nice + system + irq + softirq) / clock_ticks


def cores_from_stat(stat: str) -> int:
    """How many cores the first line of /proc/stat sums: one `cpuN` line each."""
    return sum(1 for line in stat.splitlines() if re.match(r"cpu[0-9]+ ", line))


def machine_busy_cpu_seconds() -> float:
    return busy_cpu_seconds_from_stat(Path("/proc/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def machine_cores() -> int:
    return cores_from_stat(Path("/proc/stat").read_text())


def process_cpu_seconds(pid: int) -> float:
    return cpu_seconds_from_stat(Path(f"/proc/{pid}/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def process_memory(pid: int) -> ProcessMemory:
    return memory_from_status(Path(f"/proc/{pid}/status").read_text())


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


@dataclass
class ChildConsumer:
    """A consumer process that answered `/readyz`; `ready_at` is perf_counter() when it did."""

    process: asyncio.subprocess.Process
    probe_port: int
    log_path: Path
    ready_at: float = 0.0

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def memory(self) -> ProcessMemory:
        return process_memory(self.pid)

    async def get(self, path: str) -> tuple[int, str]:
        return await asyncio.to_thread(http_get, f"http://127.0.0.1:{self.probe_port}{path}")

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self, *, within_seconds: float = 40.0) -> int:
        """SIGTERM, then its exit code (killed, and -9, if it did not stop in time)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), within_seconds)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        returncode = self.process.returncode
        assert returncode is not None
        return returncode


def consumer_environment(settings: Settings, *, probe_port: int) -> dict[str, str]:
    """This process's environment with the settings a bench changed (database, topics, groups,
    batch size) and the child's own probe port; logs as JSON at INFO."""
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        "USAGE_TOPIC": settings.usage_topic,
        "DLQ_TOPIC": settings.dlq_topic,
        "ALERTS_TOPIC": settings.alerts_topic,
        "USAGE_GROUP_ID": settings.usage_group_id,
        "BUDGET_GROUP_ID": settings.budget_group_id,
        "CONSUMER_MAX_BATCH": str(settings.consumer_max_batch),
        "DATABASE_POOL_SIZE": str(settings.database_pool_size),
        "METRICS_PORT": str(probe_port),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }


@contextlib.asynccontextmanager
async def child_consumer(
    settings: Settings,
    worker: str,
    *,
    ready_poll_seconds: float = 0.01,
    ready_within_seconds: float = 90.0,
) -> AsyncIterator[ChildConsumer]:
    """`python -m llm_usage consume <worker>` with `settings`; yields once `/readyz` answers
    200 (it joined its group), polled every `ready_poll_seconds`. Logs go to a file that is
    kept. A child still running when the block ends is stopped with SIGTERM."""
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - outlives this block on purpose
        prefix=f"bench-{worker}-consumer-", suffix=".log", delete=False
    )
    with log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "llm_usage",
            "consume",
            worker,
            env=consumer_environment(settings, probe_port=port),
            stdout=log_file,
            stderr=log_file,
        )
    child = ChildConsumer(process, port, Path(log_file.name))
    try:
        deadline = time.monotonic() + ready_within_seconds
        while True:
            if process.returncode is not None:
                raise UserFacingError(
                    f"the {worker} consumer exited with {process.returncode} before it was "
                    f"ready; its log ({child.log_path}) ends with:\n{child.log_tail()}"
                )
            status, _ = await child.get("/readyz")
            if status == 200:
                child.ready_at = time.perf_counter()
                break
            if time.monotonic() > deadline:
                raise UserFacingError(
                    f"the {worker} consumer was not ready within {ready_within_seconds:.0f} s "
                    f"(log: {child.log_path})"
                )
            await asyncio.sleep(ready_poll_seconds)
        yield child
    finally:
        if process.returncode is None:
            await child.stop()
