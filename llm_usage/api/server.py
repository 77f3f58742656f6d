"""`llm-usage serve api`: the app on uvicorn, on API_HOST:API_PORT, until SIGTERM or SIGINT.

Everything a person can get wrong (no key, a bad JWKS file, a taken port, an unreachable
database) ends in one line before the first request is taken. SIGTERM/SIGINT stop taking new
connections, let requests in flight finish (up to 10 s) and exit 0.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable, Generator
from contextlib import contextmanager

import structlog
import uvicorn
from prometheus_client import CollectorRegistry

from llm_usage.api.app import create_app
from llm_usage.api.auth import TokenVerifier
from llm_usage.api.context import ApiContext, ApiMetrics
from llm_usage.core.clock import worker_clock
from llm_usage.core.errors import ConfigurationError, ServiceUnreachableError
from llm_usage.core.settings import Settings
from llm_usage.storage.pool import create_pool

GRACEFUL_SHUTDOWN_SECONDS = 10
# How long start-up waits for Kafka to say what the API's user may do.
KAFKA_CHECK_SECONDS = 10.0
# The line that says where the API listens (with `host` and `port`), which harnesses wait for.
LISTENING = "API listening."
_log = structlog.get_logger("llm_usage.api")


class _Server(uvicorn.Server):
    """uvicorn, but a stop signal ends the process with 0 instead of re-raising the signal."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        stop_signals = (signal.SIGTERM, signal.SIGINT)
        for each in stop_signals:
            loop.add_signal_handler(each, self._stop, each)
        try:
            yield
        finally:
            for each in stop_signals:
                loop.remove_signal_handler(each)

    def _stop(self, received: signal.Signals) -> None:
        _log.info("API stopping: finishing the requests in flight.", signal=received.name)
        if self.should_exit and received is signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket on host:port; a taken port or an unknown host is one line. With
    `reuse_port`, other processes that ask for it too may listen on the same port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ConfigurationError(
            f"API_HOST={host!r} is not an address to listen on ({error.strerror}); "
            "use e.g. 0.0.0.0 or 127.0.0.1"
        ) from None
    family, kind, protocol, _, address = infos[0]
    listener = socket.socket(family, kind, protocol)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        listener.bind(address)
        listener.listen(2048)
    except OSError as error:
        listener.close()
        raise ConfigurationError(
            f"cannot listen on {host}:{port} ({error.strerror}); set API_PORT to a free port "
            "(0 picks one) or API_HOST to an address of this machine"
        ) from None
    listener.setblocking(False)
    return listener


async def _check_kafka_write(settings: Settings) -> None:
    """Stop in one line if Kafka denies the API's user Write on the usage topic. A Kafka that
    does not answer yet does not stop the API: reads need no Kafka, and ingest says 503."""
    from llm_usage.kafka.authorization import require_permissions  # noqa: PLC0415 - late
    from llm_usage.kafka.permissions import Worker  # noqa: PLC0415

    try:
        await require_permissions(settings, Worker.API, seconds=KAFKA_CHECK_SECONDS)
    except ServiceUnreachableError as error:
        _log.warning("Kafka's permissions could not be checked at start.", error=str(error))


async def serve_api(
    settings: Settings, *, on_listening: Callable[[str, int], None] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT; `on_listening(host, port)` once the socket is bound."""
    verifier = TokenVerifier.from_settings(settings)
    clock = worker_clock()
    listener = bind(settings.api_host, settings.api_port, reuse_port=settings.api_reuse_port)
    try:
        pool = await create_pool(settings.database_url, size=settings.database_pool_size)
    except BaseException:
        listener.close()
        raise
    try:
        await _check_kafka_write(settings)
    except BaseException:
        await pool.close()
        listener.close()
        raise
    context = ApiContext(
        settings=settings,
        pool=pool,
        verifier=verifier,
        metrics=ApiMetrics(CollectorRegistry()),
        clock=clock,
    )
    config = uvicorn.Config(
        create_app(context),
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        server_header=False,
        timeout_keep_alive=settings.api_keep_alive_seconds,
    )
    host, port = listener.getsockname()[:2]
    _log.info(LISTENING, host=host, port=port, usage_topic=settings.usage_topic)
    if on_listening is not None:
        on_listening(host, port)
    try:
        await _Server(config).serve(sockets=[listener])
    finally:
        await context.close()
        await pool.close()
        listener.close()
    _log.info("API stopped.")
