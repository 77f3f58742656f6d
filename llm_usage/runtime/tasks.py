"""Helpers for the asyncio tasks a batch runs beside itself."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_quietly(task: asyncio.Task[Any]) -> None:
    """Cancel a task whose result is no longer wanted; its own error adds nothing. A
    cancellation of the *calling* task (shutdown) still propagates."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:  # noqa: BLE001, S110 - the caller's own error is the one that matters
        pass
