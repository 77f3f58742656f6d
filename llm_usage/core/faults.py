"""Fault injection for tests: a process that dies at one named point, as a SIGKILL would.

Only tests set `LLM_USAGE_FAULT_INJECTION`; in production it is unset and this is a no-op.
"""

from __future__ import annotations

import os
import sys

FAULT_VARIABLE = "LLM_USAGE_FAULT_INJECTION"
FAULT_EXIT_CODE = 86


def crash_here(point: str) -> None:
    """Exit at once, without cleanup, if the environment names `point`."""
    if os.environ.get(FAULT_VARIABLE) == point:
        print(f"fault injected: {point}", file=sys.stderr, flush=True)
        os._exit(FAULT_EXIT_CODE)
