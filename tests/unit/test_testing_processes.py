"""The harnesses' worker command line: `python -m llm_usage …`, optionally under pyinstrument."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llm_usage.testing.processes import free_port, http_get, llm_usage_command


def test_a_worker_runs_as_ops_run_it_with_this_interpreter() -> None:
    assert llm_usage_command("consume", "usage") == [
        sys.executable,
        "-m",
        "llm_usage",
        "consume",
        "usage",
    ]


@pytest.mark.parametrize(("profile", "renderer"), [("run.html", "html"), ("run.txt", "text")])
def test_a_profiled_worker_runs_under_pyinstrument(profile: str, renderer: str) -> None:
    assert llm_usage_command("consume", "budget", profile=Path(profile)) == [
        sys.executable,
        "-m",
        "pyinstrument",
        "-r",
        renderer,
        "-o",
        profile,
        "-m",
        "llm_usage",
        "consume",
        "budget",
    ]


def test_a_probe_nobody_answers_reads_as_status_zero() -> None:
    status, why = http_get(f"http://127.0.0.1:{free_port()}/readyz", timeout=1.0)

    assert status == 0
    assert why
