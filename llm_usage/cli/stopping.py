"""SIGTERM for commands that are PID 1 in a container.

The kernel ignores a signal that PID 1 has no handler for: without these, a pod stopped during a
one-shot command, or while a worker is still importing, waits out its whole grace period. The
workers install handlers of their own once they run (runtime/process.py), replacing the early one.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from types import FrameType
from typing import Any, TypeVar

from llm_usage.core.errors import PipelineError

T = TypeVar("T")

# 128 + SIGTERM, what a shell reports for a process the signal ended.
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


def stop_on_sigterm_until_a_command_handles_it() -> None:
    """From the first line of `llm-usage`: a SIGTERM ends the process while it starts up."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        sys.exit(TERMINATED_EXIT_CODE)

    signal.signal(signal.SIGTERM, terminate)


async def until_sigterm(work: Coroutine[Any, Any, T], *, stopped: str) -> T:
    """`work`, cancelled by a SIGTERM, which then ends the command with the one line `stopped`
    and a non-zero exit."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    received: list[signal.Signals] = []

    def stop() -> None:
        received.append(signal.SIGTERM)
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop)
    try:
        return await task
    except asyncio.CancelledError:
        if not received:
            raise
        raise PipelineError(stopped) from None
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
