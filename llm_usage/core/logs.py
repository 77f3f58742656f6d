"""Structured logs: JSON lines for machines, coloured console lines for people."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog


def configure_logging(*, log_format: Literal["json", "console"], level: str = "INFO") -> None:
    """Route our structlog events and the libraries' stdlib logs to stderr in one format."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        # Not cached: tests reconfigure logging, and we log per batch, not per event.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    handler.addFilter(_drop_startup_noise)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # aiokafka and asyncpg are chatty at INFO (every rebalance step); their warnings matter.
    root.setLevel(logging.WARNING)


def _drop_startup_noise(record: logging.LogRecord) -> bool:
    """aiokafka logs at ERROR while a fresh broker elects its group coordinator, then retries
    by itself; operators learned to ignore it, which hides the errors that matter."""
    return "GroupCoordinatorNotAvailableError" not in record.getMessage()
