"""The probe server: /healthz, /readyz and /metrics over real HTTP on a free port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from llm_usage.rollup.schedule import scheduler_health
from llm_usage.runtime.probes import HealthState, ProbeServer, keep_heartbeat, serve_probes


@pytest.fixture
def served() -> Iterator[tuple[ProbeServer, HealthState]]:
    registry = CollectorRegistry()
    Counter("probe_test_total", "A counter to find in /metrics.", registry=registry).inc(3)
    state = HealthState(stall_after_seconds=60)
    server = serve_probes(port=0, registry=registry, state=state)
    yield server, state
    server.close()


def _get(server: ProbeServer, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_readyz_follows_the_consumer_state(served: tuple[ProbeServer, HealthState]) -> None:
    server, state = served
    assert _get(server, "/readyz") == (503, "not ready: not in the consumer group yet\n")
    state.started()
    assert _get(server, "/readyz") == (200, "ready\n")
    state.hold("batch", "retrying database")
    state.hold("stopped:usage:1", "usage[1] stopped at offset 7: undecodable")
    assert _get(server, "/readyz") == (
        503,
        "not ready: retrying database; usage[1] stopped at offset 7: undecodable\n",
    )
    state.release("batch")
    assert _get(server, "/readyz") == (
        503,
        "not ready: usage[1] stopped at offset 7: undecodable\n",
    )
    state.release("stopped:usage:1")
    assert _get(server, "/readyz") == (200, "ready\n")


def test_a_slow_client_does_not_block_the_probes(served: tuple[ProbeServer, HealthState]) -> None:
    server, state = served
    state.started()
    # A client that connects and sends half a request, then waits: a single-threaded server
    # would sit in its read until it timed out, and the kubelet's probe would fail meanwhile.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        assert _get(server, "/readyz") == (200, "ready\n")


def test_healthz_fails_when_the_loop_stalls(served: tuple[ProbeServer, HealthState]) -> None:
    server, state = served
    assert _get(server, "/healthz")[0] == 200
    state.last_progress -= 61
    assert _get(server, "/healthz")[0] == 503
    state.progressed()
    assert _get(server, "/healthz")[0] == 200


def test_metrics_serves_the_registry(served: tuple[ProbeServer, HealthState]) -> None:
    status, body = _get(served[0], "/metrics")
    assert status == 200
    assert "probe_test_total 3.0" in body


def test_the_event_loop_going_silent_fails_healthz(
    served: tuple[ProbeServer, HealthState],
) -> None:
    server, state = served
    state.last_beat -= state.loop_stall_seconds + 1
    status, body = _get(server, "/healthz")
    assert status == 503
    assert body.startswith("stalled: the event loop has not answered for ")
    state.beat()
    assert _get(server, "/healthz")[0] == 200


async def _get_later(server: ProbeServer, path: str, *, after: float) -> tuple[int, str]:
    """GET `path` from another thread `after` seconds from now, whatever the loop is doing."""
    asker = _Asker(server, path, after=after)
    await asyncio.to_thread(asker.join)
    return asker.answer[0]


class _Asker(threading.Thread):
    """A GET sent from its own thread after a while (the event loop may be blocked then)."""

    def __init__(self, server: ProbeServer, path: str, *, after: float) -> None:
        super().__init__()
        self.server, self.path, self.after = server, path, after
        self.answer: list[tuple[int, str]] = []
        self.start()

    def run(self) -> None:
        time.sleep(self.after)
        self.answer.append(_get(self.server, self.path))


async def test_a_tick_longer_than_the_stall_window_keeps_the_scheduler_alive() -> None:
    state = scheduler_health()
    state.loop_stall_seconds = 0.5
    server = serve_probes(port=0, registry=CollectorRegistry(), state=state)
    heartbeat = asyncio.create_task(keep_heartbeat(state, every=0.05))
    try:
        # The tick: an await of three stall windows (a month-end rollup waiting on PostgreSQL),
        # with no progress reported meanwhile.
        tick = asyncio.create_task(asyncio.sleep(1.5))
        assert await _get_later(server, "/healthz", after=1.2) == (200, "ok\n")
        await tick
    finally:
        heartbeat.cancel()
        server.close()


async def test_a_blocked_event_loop_fails_healthz() -> None:
    state = scheduler_health()
    state.loop_stall_seconds = 0.5
    server = serve_probes(port=0, registry=CollectorRegistry(), state=state)
    heartbeat = asyncio.create_task(keep_heartbeat(state, every=0.05))
    try:
        await asyncio.sleep(0.1)
        asker = _Asker(server, "/healthz", after=1.0)
        time.sleep(1.5)  # noqa: ASYNC251 - the point: a synchronous call blocking the loop
        await asyncio.to_thread(asker.join)
        status, body = asker.answer[0]
        assert status == 503
        assert body.startswith("stalled: the event loop has not answered")
        await asyncio.sleep(0.2)  # the loop answers again: so does liveness
        assert _get(server, "/healthz")[0] == 200
    finally:
        heartbeat.cancel()
        server.close()


def test_a_consumer_still_fails_healthz_when_its_batch_loop_stops_progressing() -> None:
    state = HealthState(stall_after_seconds=60)
    state.last_progress -= 61
    reason = state.stalled()
    assert reason is not None
    assert reason.startswith("the consumer loop has not progressed")
    assert scheduler_health().stall_after_seconds is None
