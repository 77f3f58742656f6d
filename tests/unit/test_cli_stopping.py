"""SIGTERM while a command is PID 1: one-shot commands end with their one line, and a process
still starting up ends at once instead of waiting out the grace period."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from llm_usage.cli.stopping import TERMINATED_EXIT_CODE, until_sigterm
from llm_usage.core.errors import PipelineError


async def test_a_sigterm_cancels_the_work_and_ends_in_the_commands_line() -> None:
    started = asyncio.Event()

    async def work() -> str:
        started.set()
        await asyncio.sleep(30)
        return "finished"

    async def send_sigterm() -> None:
        await started.wait()
        os.kill(os.getpid(), signal.SIGTERM)

    sender = asyncio.create_task(send_sigterm())
    with pytest.raises(PipelineError, match="stopped early; run it again"):
        await asyncio.wait_for(until_sigterm(work(), stopped="stopped early; run it again"), 10)
    await sender


async def test_without_a_sigterm_the_work_answers_and_the_handler_is_removed() -> None:
    async def work() -> str:
        return "finished"

    assert await until_sigterm(work(), stopped="unused") == "finished"
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler)


def test_a_sigterm_before_any_command_runs_ends_the_process() -> None:
    program = (
        "import os, signal, time\n"
        "from llm_usage.cli.stopping import stop_on_sigterm_until_a_command_handles_it\n"
        "stop_on_sigterm_until_a_command_handles_it()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"
    )
    finished = subprocess.run([sys.executable, "-c", program], timeout=20, check=False)
    assert finished.returncode == TERMINATED_EXIT_CODE
