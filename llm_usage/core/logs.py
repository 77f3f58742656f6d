"""Structured logs: JSON lines for machines, coloured console lines for people."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    handler.addFilter(RepeatSuppressor(emit=handler.handle).start())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # aiokafka and asyncpg are chatty at INFO (every rebalance step); their warnings matter.
    root.setLevel(logging.WARNING)


def _drop_startup_noise(record: logging.LogRecord) -> bool:
    """aiokafka logs at ERROR while a fresh broker elects its group coordinator, then retries
    by itself; operators learned to ignore it, which hides the errors that matter."""
    return "GroupCoordinatorNotAvailableError" not in record.getMessage()


_VARIABLE_PARTS = re.compile(r"\d+")
_SUMMARY_MARK = "llm_usage_repeat_summary"


@dataclass
class _Repeats:
    first: logging.LogRecord
    since: float
    last_seen: float
    last_summary: float
    suppressed: int = 0
    total: int = 1


class RepeatSuppressor(logging.Filter):
    """Turns a storm of one library warning or error (aiokafka logs one every 100 ms while a
    broker is down) into three lines: the first, a summary with a count every
    `summary_seconds` while it lasts, and one when it has been quiet for `quiet_seconds`.
    Lines are "the same" when they differ only in numbers. The metrics keep the detail."""

    def __init__(
        self,
        *,
        emit: Callable[[logging.LogRecord], object],
        summary_seconds: float = 60.0,
        quiet_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._emit = emit
        self._summary_seconds = summary_seconds
        self._quiet_seconds = quiet_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._repeats: dict[tuple[str, int, str], _Repeats] = {}

    def start(self) -> RepeatSuppressor:
        """Check for storms that ended every few seconds, from a daemon thread."""

        def check_regularly() -> None:
            while True:
                time.sleep(min(5.0, self._quiet_seconds))
                self.flush_ended()

        threading.Thread(target=check_regularly, name="log-repeats", daemon=True).start()
        return self

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno < logging.WARNING
            or record.name.startswith("llm_usage")
            or getattr(record, _SUMMARY_MARK, False)
        ):
            return True
        key = (record.name, record.levelno, _VARIABLE_PARTS.sub("#", record.getMessage()))
        now = self._clock()
        with self._lock:
            repeats = self._repeats.get(key)
            if repeats is None:
                self._repeats[key] = _Repeats(record, now, now, now)
                return True
            repeats.last_seen = now
            repeats.total += 1
            repeats.suppressed += 1
            if now - repeats.last_summary < self._summary_seconds:
                return False
            count, repeats.suppressed, repeats.last_summary = repeats.suppressed, 0, now
        elapsed = now - repeats.since
        record.msg = f"{record.getMessage()} [{count} more since the last line; {repeats.total} in "
        record.msg += f"{elapsed:.0f} s, still happening]"
        record.args = None
        return True

    def flush_ended(self) -> None:
        """Say once that each storm quiet for `quiet_seconds` ended, with its count."""
        now = self._clock()
        with self._lock:
            ended = [
                (key, repeats)
                for key, repeats in self._repeats.items()
                if now - repeats.last_seen >= self._quiet_seconds
            ]
            for key, _ in ended:
                del self._repeats[key]
        for _, repeats in ended:
            if repeats.total == 1:
                continue  # it happened once: its one line said everything
            first = repeats.first
            summary = logging.LogRecord(
                first.name,
                first.levelno,
                first.pathname,
                first.lineno,
                f"{first.getMessage()} [stopped: {repeats.total} times over "
                f"{repeats.last_seen - repeats.since:.0f} s]",
                None,
                None,
            )
            setattr(summary, _SUMMARY_MARK, True)
            self._emit(summary)
