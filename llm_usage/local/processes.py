"""Is a process we started still the one we mean? (Shared by the Kafka and Postgres launchers.)"""

from __future__ import annotations

import os
from pathlib import Path


def runs_with(pid: int, marker: str) -> bool:
    """`pid` is alive and its command line names `marker` (so not a zombie or a reused pid)."""
    if not Path("/proc/self/cmdline").exists():  # no procfs: being alive is all we can tell
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # alive, owned by another user (the embedded Postgres runs as its own)
        return True
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # alive; only its owner may read more
