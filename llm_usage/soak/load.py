"""The soak's gateway: a steady rate of usage events from three producers, as real gateways send
them, with every acknowledgement written into the ledger the checker reads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer

from llm_usage.soak.ledger import Ledger, SentEvent
from llm_usage.soak.scenario import EventFactory, Scenario, encode, reserialised

log = structlog.get_logger(__name__)

_TICK = 0.01
_MAX_IN_FLIGHT = 20_000
_CATCH_UP = 2.0  # behind schedule, send at most this many times the rate
_TRANSACTION_SIZE = 50
_RECENT = 2_000  # events kept for duplicates and conflicts
_FLUSH_WITHIN = 180.0
_HEADERS = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]


@dataclass(frozen=True)
class _Sent:
    event: dict[str, Any]
    value: bytes
    keyed: bool


class LoadGenerator:
    def __init__(
        self, scenario: Scenario, *, bootstrap_servers: str, topic: str, ledger: Ledger
    ) -> None:
        self._scenario = scenario
        self._bootstrap = bootstrap_servers
        self._topic = topic
        self._ledger = ledger
        self._factory = EventFactory(scenario)
        self._rng = random.Random(f"soak-load-{scenario.seed}")
        self._recent: deque[_Sent] = deque(maxlen=_RECENT)
        self._in_flight = asyncio.Semaphore(_MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._transaction: list[dict[str, Any]] = []
        self._published = 0

    @property
    def published(self) -> int:
        return self._published

    async def run(self, stopping: asyncio.Event) -> None:
        common = {"bootstrap_servers": self._bootstrap, "acks": "all", "enable_idempotence": True}
        self._keyed = AIOKafkaProducer(compression_type="gzip", linger_ms=5, **common)
        self._unkeyed = AIOKafkaProducer(compression_type="lz4", linger_ms=5, **common)
        await self._keyed.start()
        await self._unkeyed.start()
        self._transactional = await self._new_transactional()
        try:
            await self._publish(stopping)
            await self._finish_transaction()
            await self._flush()
        finally:
            for producer in (self._keyed, self._unkeyed, self._transactional):
                try:
                    await asyncio.wait_for(producer.stop(), 30)
                except Exception as error:  # noqa: BLE001 - stopping after the run
                    log.warning("A soak producer did not stop cleanly.", error=str(error))

    async def _new_transactional(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            transactional_id=f"soak-{self._scenario.seed}-{time.time_ns()}",
            compression_type="zstd",
            linger_ms=5,
        )
        await producer.start()
        return producer

    async def _publish(self, stopping: asyncio.Event) -> None:
        started = time.monotonic()
        total = int(self._scenario.rate * self._scenario.seconds)
        sent = 0
        while sent < total and not stopping.is_set():
            elapsed = time.monotonic() - started
            due = min(total, int(elapsed * self._scenario.rate))
            burst = min(due - sent, int(self._scenario.rate * _TICK * _CATCH_UP) + 1)
            for _ in range(max(burst, 0)):
                await self._in_flight.acquire()
                await self._one()
                sent += 1
            await asyncio.sleep(_TICK)

    async def _one(self) -> None:
        mix, rng = self._scenario.mix, self._rng
        draw = rng.random()
        now = self._scenario.clock.now()
        if draw < mix.duplicate and self._recent:
            previous = rng.choice(self._recent)
            self._send(previous.value, previous.event, "duplicate", keyed=previous.keyed)
        elif draw < mix.duplicate + mix.reserialised_duplicate and self._recent:
            previous = rng.choice(self._recent)
            value = reserialised(previous.event)
            self._send(value, previous.event, "reserialised_duplicate", keyed=previous.keyed)
        elif draw < mix.duplicate + mix.reserialised_duplicate + mix.conflicting:
            originals = [sent for sent in self._recent if sent.keyed]
            if originals:
                changed = encode(self._factory.conflicting(rng.choice(originals).event))
                self._ledger.expect_dead_letter(changed, "conflicting_duplicate")
                self._send(changed, None, "conflicting", keyed=True)
            else:
                self._in_flight.release()
        elif draw < mix.duplicate + mix.reserialised_duplicate + mix.conflicting + mix.malformed:
            value, reason = self._factory.malformed()
            self._ledger.expect_dead_letter(value, reason)
            self._send(value, None, "malformed", keyed=rng.random() < 0.5)
        else:
            late = now >= self._scenario.month_end and rng.random() < mix.late
            moment = self._factory.late_moment() if late else now
            event = self._factory.event(occurred_at=moment, late=late)
            if rng.random() < mix.transactional:
                self._in_flight.release()
                self._transaction.append(event)
                if len(self._transaction) >= _TRANSACTION_SIZE:
                    await self._finish_transaction()
                return
            keyed = rng.random() < 0.6
            self._send(encode(event), event, "late" if late else "event", keyed=keyed)

    def _send(self, value: bytes, event: dict[str, Any] | None, kind: str, *, keyed: bool) -> None:
        task = asyncio.create_task(self._deliver(value, event, kind, keyed=keyed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self, value: bytes, event: dict[str, Any] | None, kind: str, *, keyed: bool
    ) -> None:
        """Send until acknowledged: a second copy of a record is only a duplicate."""
        key = event["tenant_id"].encode() if keyed and event else None
        if keyed and event is None:
            key = self._rng.choice(self._scenario.tenants).tenant_id.encode()
            if kind == "conflicting":
                key = _tenant_of(value)
        producer = self._keyed if keyed else self._unkeyed
        try:
            while True:
                try:
                    sent = await producer.send(self._topic, value, key=key, headers=_HEADERS)
                    await sent
                    break
                except Exception as error:  # noqa: BLE001 - the cluster lost a broker: again
                    self._ledger.sent["retried_send"] += 1
                    log.info("Soak send failed; retrying.", error=f"{type(error).__name__}")
                    await asyncio.sleep(0.5)
            self._acknowledged(value, event, kind, keyed=keyed)
        finally:
            self._in_flight.release()

    def _acknowledged(
        self, value: bytes, event: dict[str, Any] | None, kind: str, *, keyed: bool
    ) -> None:
        self._published += 1
        self._ledger.sent[kind] += 1
        if event is not None:
            self._ledger.record_event(_sent_event(event))
            if kind in ("event", "late", "transactional_committed"):
                self._recent.append(_Sent(event, value, keyed))

    async def _finish_transaction(self) -> None:
        events, self._transaction = self._transaction, []
        if not events:
            return
        abort = self._rng.random() < self._scenario.mix.aborted_transactions
        producer = self._transactional
        try:
            await asyncio.wait_for(producer.begin_transaction(), 30)
            for event in events:
                await producer.send(self._topic, encode(event), key=event["tenant_id"].encode())
            if abort:
                self._ledger.aborted_ids.update(event["gateway_request_id"] for event in events)
                await asyncio.wait_for(producer.abort_transaction(), 30)
                self._ledger.sent["transactional_aborted"] += len(events)
                return
            await asyncio.wait_for(producer.commit_transaction(), 30)
        except Exception as error:  # noqa: BLE001 - a broker went away mid-transaction
            log.info("Soak transaction failed.", error=f"{type(error).__name__}: {error}")
            await self._replace_transactional()
            if abort:
                return  # never committed: its ids stay aborted and are never used again
            for event in events:
                await self._in_flight.acquire()
                self._send(encode(event), event, "resent_after_error", keyed=True)
            return
        for event in events:
            self._acknowledged(encode(event), event, "transactional_committed", keyed=True)

    async def _replace_transactional(self) -> None:
        with contextlib.suppress(Exception):  # a broken producer is dropped either way
            await asyncio.wait_for(self._transactional.stop(), 10)
        while True:
            try:
                self._transactional = await asyncio.wait_for(self._new_transactional(), 30)
                return
            except Exception as error:  # noqa: BLE001 - the cluster is still recovering
                log.info("Soak transactional producer not back yet.", error=str(error))
                await asyncio.sleep(1.0)

    async def _flush(self) -> None:
        deadline = time.monotonic() + _FLUSH_WITHIN
        while self._tasks:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(self._tasks)} records were not acknowledged within "
                    f"{_FLUSH_WITHIN:.0f} s after the load"
                )
            await asyncio.sleep(0.2)


def _tenant_of(value: bytes) -> bytes:
    return str(json.loads(value)["tenant_id"]).encode()


def _sent_event(event: dict[str, Any]) -> SentEvent:
    return SentEvent(
        gateway_request_id=event["gateway_request_id"],
        tenant_id=event["tenant_id"],
        deployment_id=event["deployment_id"],
        user_id=event["user_id"],
        agent_id=event["agent_id"],
        customer_charge_usd=Decimal(event["customer_charge_usd"]),
        input_tokens=event["input_tokens"],
        output_tokens=event["output_tokens"],
        occurred_at=datetime.fromisoformat(event["occurred_at"]),
        acked_at=time.time(),
    )
