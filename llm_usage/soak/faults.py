"""Carrying out the soak's fault schedule against the running cluster, database and workers."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal

from aiokafka.admin import AIOKafkaAdminClient

from llm_usage.local.kafka import KafkaCluster
from llm_usage.local.postgres import LocalPostgres
from llm_usage.soak.plan import PlannedFault
from llm_usage.soak.timeline import FaultMark
from llm_usage.soak.workers import WorkerFleet

_SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}


@dataclass
class FaultInjector:
    """Runs each planned fault at its time (seconds after `load_started`, Unix time) and records
    a `FaultMark` for it, with what actually happened (e.g. which broker led the partition)."""

    plan: list[PlannedFault]
    fleet: WorkerFleet
    cluster: KafkaCluster
    postgres: LocalPostgres
    topic: str
    lower_policy: Callable[[], Awaitable[str]]
    load_started: float
    marks: list[FaultMark] = field(default_factory=list)
    _holds: list[asyncio.Task[None]] = field(default_factory=list)

    async def run(self) -> None:
        for fault in self.plan:
            await asyncio.sleep(max(0.0, self.load_started + fault.at - time.time()))
            try:
                await self._inject(fault)
            except Exception as error:  # noqa: BLE001 - a fault that could not be injected is reported
                self._mark(fault, f"could not be injected: {type(error).__name__}: {error}")
        # Whatever is still down or paused comes back before the run drains.
        await asyncio.gather(*self._holds)

    def _mark(self, fault: PlannedFault, detail: str, *, target: str | None = None) -> None:
        mark = FaultMark(
            t=round(time.time() - self.load_started, 1),
            kind=fault.kind,
            target=target or fault.target,
            detail=detail,
        )
        self.marks.append(mark)
        print(f"  t={mark.t:7.1f} s  {mark.kind:<16} {mark.target}  {detail}", flush=True)

    async def _inject(self, fault: PlannedFault) -> None:
        if fault.kind in _SIGNALS:
            sent = self.fleet.signal(fault.target, _SIGNALS[fault.kind], restart_after=fault.hold)
            self._mark(
                fault,
                f"restarts {fault.hold:.1f} s after it exits" if sent else "skipped: not running",
            )
        elif fault.kind == "sigstop":
            self._mark(fault, f"paused for {fault.hold:.1f} s")
            self._holds.append(asyncio.create_task(self._pause(fault)))
        elif fault.kind == "broker_restart":
            partition = int(fault.target.rsplit(" ", 1)[1])
            leader = await self._leader_of(partition)
            await asyncio.to_thread(self.cluster.kill_node, leader - 1)
            self._mark(
                fault,
                f"SIGKILL, back in {fault.hold:.1f} s",
                target=f"broker {leader} ({fault.target})",
            )
            self._holds.append(asyncio.create_task(self._restart_broker(leader - 1, fault.hold)))
        elif fault.kind == "postgres_restart":
            started = time.monotonic()
            await asyncio.to_thread(self.postgres.restart)
            self._mark(fault, f"fast shutdown and start, {time.monotonic() - started:.1f} s")
        elif fault.kind == "policy_lowered":
            self._mark(fault, await self.lower_policy())
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")

    async def _pause(self, fault: PlannedFault) -> None:
        if not await self.fleet.pause(fault.target, fault.hold):
            self._mark(fault, "skipped: not running")

    async def _restart_broker(self, index: int, hold: float) -> None:
        await asyncio.sleep(hold)
        await asyncio.to_thread(self.cluster.start_node, index)
        back = time.time() - self.load_started
        print(f"  t={back:7.1f} s  broker {index + 1} is back", flush=True)

    async def _leader_of(self, partition: int) -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.cluster.bootstrap_servers)
        await admin.start()
        try:
            [described] = await admin.describe_topics([self.topic])
        finally:
            await admin.close()
        leaders = {int(p["partition"]): int(p["leader"]) for p in described["partitions"]}
        return leaders[partition] if leaders.get(partition, -1) >= 1 else 1


def lowered_limit(spend_usd: Decimal) -> Decimal:
    """Half the recorded spend (both levels crossed at once), or a cent when nothing is recorded."""
    if spend_usd <= 0:
        return Decimal("0.01")
    return max((spend_usd / 2).quantize(Decimal("0.000001")), Decimal("0.000001"))
