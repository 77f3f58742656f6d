"""The `wrk` HTTP load generator, driven from a benchmark: a Lua script (written to a temporary
file) builds each request (a random one of a list of paths to GET, or whatever Lua `request()`
a benchmark gives: `bench checks` POSTs a fresh body each time), may pace each connection with
`delay()`, and prints, when the run is done, one JSON line of exact figures from wrk's own
latency histogram."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# The line of wrk's output that carries the figures, printed by the script's `done`.
RESULT_MARK: Final = "WRK_RESULT "

# Each thread gets its own `seed` (0, 1, ...): its random choices differ from the others', and a
# request function can number what it sends per thread with it.
_PROLOGUE = """\
local threads = 0
function setup(thread)
  thread:set("seed", threads)
  threads = threads + 1
end
function init(args)
  math.randomseed(1 + 7919 * seed)
end
"""
_GET_ONE_OF = """\
local paths = {
%(paths)s
}
function request()
  return wrk.format("GET", paths[math.random(#paths)])
end
"""
# wrk waits this many milliseconds before each request of a connection.
_DELAY = """\
function delay()
  return %(delay_ms)d
end
"""
_DONE = """\
function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '%(mark)s{"requests": %%d, "duration_us": %%d, "non_2xx": %%d, "socket_errors": %%d, '
    .. '"p50_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


class WrkMissingError(SystemExit):
    """`wrk` is not on PATH: one line that says how to get it."""

    def __init__(self) -> None:
        super().__init__(
            "`wrk` (the HTTP load generator) is not on PATH: apt-get install wrk "
            "(Debian/Ubuntu), or brew install wrk"
        )


@dataclass(frozen=True)
class WrkResult:
    """Requests answered in a run and wrk's latency percentiles, in milliseconds; `non_2xx` are
    counted in `requests` (only a run read with `errors_allowed` has any)."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int = 0

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise WrkMissingError
    return found


def script(request: str, *, delay_ms: int | None = None) -> str:
    """A whole script around `request`, Lua that defines `request()` (it may use each thread's
    `seed`); with `delay_ms`, each connection waits that long before each request."""
    paced = "" if delay_ms is None else _DELAY % {"delay_ms": delay_ms}
    return _PROLOGUE + request + paced + _DONE % {"mark": RESULT_MARK}


def lua_script(paths: Sequence[str]) -> str:
    """The script that sends a random one of `paths` (each starting with "/") each time."""
    if not paths or not all(path.startswith("/") for path in paths):
        raise ValueError("wrk needs at least one path, each starting with /")
    listed = ",\n".join(f"  {json.dumps(path)}" for path in paths)
    return script(_GET_ONE_OF % {"paths": listed})


def parse_result(output: str, *, errors_allowed: bool = False) -> WrkResult:
    """The figures of the script's JSON line; a non-2xx answer or a socket error fails the run,
    as a benchmark of errors measures nothing, unless `errors_allowed` (non-2xx answers only:
    a step that pushes a server past its limit counts them)."""
    lines = [line for line in output.splitlines() if line.startswith(RESULT_MARK)]
    if len(lines) != 1:
        raise SystemExit(f"wrk printed no result line:\n{output[-2000:]}")
    found = json.loads(lines[0].removeprefix(RESULT_MARK))
    if (found["non_2xx"] and not errors_allowed) or found["socket_errors"]:
        raise SystemExit(
            f"wrk: {found['non_2xx']} answers were not 2xx and {found['socket_errors']} "
            f"requests failed on the socket, of {found['requests']}"
        )
    if not found["requests"]:
        raise SystemExit("wrk sent no request in its run")
    return WrkResult(
        requests=found["requests"],
        seconds=found["duration_us"] / 1e6,
        p50_ms=found["p50_us"] / 1000,
        p99_ms=found["p99_us"] / 1000,
        max_ms=found["max_us"] / 1000,
        non_2xx=found["non_2xx"],
    )


async def run_wrk(
    base_url: str,
    paths: Sequence[str],
    *,
    connections: int,
    threads: int,
    seconds: float,
    headers: Sequence[str] = (),
) -> WrkResult:
    """Run wrk against `base_url` for `seconds`, `connections` connections over `threads`
    threads, each request a random one of `paths`."""
    return await run_wrk_script(
        base_url,
        lua_script(paths),
        connections=connections,
        threads=threads,
        seconds=seconds,
        headers=headers,
    )


async def run_wrk_script(
    base_url: str,
    text: str,
    *,
    connections: int,
    threads: int,
    seconds: float,
    headers: Sequence[str] = (),
    errors_allowed: bool = False,
) -> WrkResult:
    """Run wrk with the script `text` (see `script`) against `base_url` for `seconds`,
    `connections` connections over `threads` threads."""
    binary = wrk_binary()
    with tempfile.TemporaryDirectory(prefix="llm-usage-wrk-") as directory:
        path = Path(directory) / "requests.lua"
        path.write_text(text, encoding="utf-8")
        arguments = [
            f"--threads={min(threads, connections)}",
            f"--connections={connections}",
            f"--duration={max(1, round(seconds))}s",
            "--timeout=60s",
            f"--script={path}",
        ]
        for header in headers:
            arguments += ["--header", header]
        process = await asyncio.create_subprocess_exec(
            binary,
            *arguments,
            base_url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
    output_text = output.decode(errors="replace")
    if process.returncode:
        raise SystemExit(f"wrk exited with {process.returncode}:\n{output_text[-2000:]}")
    return parse_result(output_text, errors_allowed=errors_allowed)


async def wrk_version() -> str:
    """wrk's first line of `--version`, e.g. `wrk debian/4.1.0-3+b2 [epoll]`."""
    process = await asyncio.create_subprocess_exec(
        wrk_binary(), "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    first = output.decode(errors="replace").splitlines()[0]
    return first.split(" Copyright")[0].strip()
