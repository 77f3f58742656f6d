"""The probe server: /healthz, /readyz and /metrics over real HTTP on a free port."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from llm_usage.runtime.probes import HealthState, ProbeServer, serve_probes


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
