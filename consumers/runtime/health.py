"""`/metrics`, `/healthz` and `/readyz` on METRICS_PORT, served from a daemon thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from llm_usage.core.errors import ConfigurationError

StartResponse = Callable[..., Any]


@dataclass
class HealthState:
    """What the probes report. Written by the event loop, read by the HTTP thread.

    Plain attribute writes are atomic under the GIL, which is all the sharing this needs.
    """

    stall_after_seconds: float = 120.0
    ready: bool = False
    reason: str = "starting"
    last_progress: float = field(default_factory=time.monotonic)

    def progressed(self) -> None:
        """The loop is alive: it finished a poll or a batch."""
        self.last_progress = time.monotonic()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.ready = ready
        self.reason = reason

    def is_alive(self) -> bool:
        return time.monotonic() - self.last_progress < self.stall_after_seconds


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes hit this every few seconds; access logs would drown the real ones."""


def _probe_app(
    state: HealthState, metrics_app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            ok = state.is_alive()
            body = b"ok\n" if ok else b"stalled: the consumer loop has not progressed\n"
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
        server = make_server("0.0.0.0", port, app, handler_class=_QuietHandler)  # noqa: S104
    except OSError as error:
        raise ConfigurationError(
            f"cannot serve metrics on port {port} ({error.strerror}); "
            "set METRICS_PORT to a free port (0 picks one)"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="probe-server", daemon=True)
    thread.start()
    return ProbeServer(server=server, thread=thread)
