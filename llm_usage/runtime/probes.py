"""`/metrics`, `/healthz` and `/readyz` on METRICS_PORT, served by a thread per request (so one
slow client cannot block the kubelet's probes).

Liveness means the event loop answers: a heartbeat task beats every second, and `/healthz`
fails once it has not beaten for `loop_stall_seconds` (a loop blocked by a synchronous call, or
wedged). A consumer also fails it when its batch loop has not progressed for
`stall_after_seconds` (a fetch or commit that never returns); a worker whose work may rightly
take minutes at a time (the rollup schedule) sets that to None.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from llm_usage.core.errors import ConfigurationError

StartResponse = Callable[..., Any]


@dataclass
class HealthState:
    """What the probes report. Written by the event loop, read by the HTTP threads.

    Ready means: the worker has started (a consumer: joined its group) and nothing holds work
    back (a batch being retried, a partition stopped at a batch it cannot decode). Each hold has
    a name, so that one clearing does not hide another. Dict writes and reads are atomic under
    the GIL.
    """

    # Liveness: how long the consumer loop may go without progress (None: not checked), and
    # how long the event loop may go without a heartbeat.
    stall_after_seconds: float | None = 120.0
    loop_stall_seconds: float = 30.0
    # What readiness waits for first: a consumer joining its group, a scheduler its first run.
    starting_reason: str = "not in the consumer group yet"
    has_started: bool = False
    holds: dict[str, str] = field(default_factory=dict)
    last_progress: float = field(default_factory=time.monotonic)
    last_beat: float = field(default_factory=time.monotonic)

    def beat(self) -> None:
        """The event loop answered (called by `keep_heartbeat`)."""
        self.last_beat = time.monotonic()

    def progressed(self) -> None:
        """The loop is alive: it finished a poll or a batch."""
        self.last_progress = time.monotonic()

    def started(self) -> None:
        self.has_started = True

    def hold(self, name: str, reason: str) -> None:
        self.holds[name] = reason

    def release(self, name: str) -> None:
        self.holds.pop(name, None)

    @property
    def ready(self) -> bool:
        return self.has_started and not self.holds

    @property
    def reason(self) -> str:
        if not self.has_started:
            return self.starting_reason
        return "; ".join(sorted(dict(self.holds).values()))

    def stalled(self) -> str | None:
        """Why the worker is not alive, or None while it is."""
        now = time.monotonic()
        silent = now - self.last_beat
        if silent >= self.loop_stall_seconds:
            return f"the event loop has not answered for {silent:.0f} s"
        if self.stall_after_seconds is not None:
            idle = now - self.last_progress
            if idle >= self.stall_after_seconds:
                return f"the consumer loop has not progressed for {idle:.0f} s"
        return None

    def is_alive(self) -> bool:
        return self.stalled() is None


HEARTBEAT_SECONDS = 1.0


async def keep_heartbeat(state: HealthState, *, every: float = HEARTBEAT_SECONDS) -> None:
    """Beat every `every` seconds until cancelled: liveness while the event loop answers."""
    while True:
        state.beat()
        await asyncio.sleep(every)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes hit this every few seconds; access logs would drown the real ones."""


def _probe_app(
    state: HealthState, metrics_app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            stalled = state.stalled()
            ok = stalled is None
            body = b"ok\n" if stalled is None else f"stalled: {stalled}\n".encode()
        elif path == "/readyz":
            ok = state.ready
            body = b"ready\n" if ok else f"not ready: {state.reason}\n".encode()
        else:
            return metrics_app(environ, start_response)
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [body]

    return app


@dataclass
class ProbeServer:
    """A running probe server; `close()` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_probes(*, port: int, registry: CollectorRegistry, state: HealthState) -> ProbeServer:
    """Serve the registry and the probes on `port` (0 picks a free one)."""
    app = _probe_app(state, make_wsgi_app(registry))
    try:
        server = make_server(
            "0.0.0.0",  # noqa: S104 - probes come from the kubelet and Prometheus, not loopback
            port,
            app,
            server_class=ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
    except OSError as error:
        raise ConfigurationError(
            f"cannot serve metrics on port {port} ({error.strerror}); "
            "set METRICS_PORT to a free port (0 picks one)"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="probe-server", daemon=True)
    thread.start()
    return ProbeServer(server=server, thread=thread)
