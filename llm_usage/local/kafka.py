"""A real Apache Kafka broker in KRaft mode, run with `java` from Maven Central jars: no Docker.

One node (combined broker and controller) for development and tests, or three on one host for
failover tests. Node i (from 0) listens on `port + 2*i` and its controller on `port + 2*i + 1`.
A single node may also open a SASL_SSL listener (SCRAM-SHA-512 over TLS) on `port + 2`, beside
its PLAINTEXT one, for tests of the clients' security settings (see `SaslSslListener`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from llm_usage.core.errors import LocalServiceError
from llm_usage.local.paths import cache_dir, exclusive_lock
from llm_usage.local.processes import runs_with

_KAFKA_DIR = Path(__file__).resolve().parent / "broker"
POM = _KAFKA_DIR / "pom.xml"
LOG4J2_CONFIG = _KAFKA_DIR / "log4j2.properties"

_COMPLETE = ".complete"
_INSTALL_JAVA = "install a Java 17+ runtime (e.g. `apt-get install openjdk-17-jre-headless`)"
_INSTALL_MAVEN = "install Maven (e.g. `apt-get install maven`)"
_POLL_SECONDS = 0.25
# SCRAM user names and passwords go into a `--add-scram` argument and a properties file unquoted.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_.-]+")


def kafka_version() -> str:
    """The Kafka version the pom resolves (its `kafka.version` property)."""
    found = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", POM.read_text())
    if found is None:
        raise LocalServiceError(f"{POM} names no <kafka.version>; the package is damaged")
    return found.group(1)


def ensure_kafka_jars(cache: Path | None = None) -> Path:
    """Return `<cache>/kafka-<version>/libs`, fetching the broker's jars with Maven if missing.

    The directory is used only once a marker says it is complete, so an interrupted download is
    never used: it is fetched again. Two processes asking at once download once.
    """
    root = (cache or cache_dir()) / f"kafka-{kafka_version()}"
    libs = root / "libs"
    if (root / _COMPLETE).exists():
        return libs
    _require_tool("java", f"{_INSTALL_JAVA} to run the local Kafka broker")
    mvn = _require_tool("mvn", f"{_INSTALL_MAVEN} to fetch the Kafka jars the first time")
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".lock"):
        if (root / _COMPLETE).exists():
            return libs
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
        try:
            # Maven runs beside a copy of the pom: the installed package may be read-only.
            pom = shutil.copy(POM, staging / "pom.xml")
            result = subprocess.run(
                [
                    mvn,
                    "-B",
                    "-q",
                    "-Dstyle.color=never",
                    "-f",
                    str(pom),
                    "dependency:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-DoutputDirectory={staging / 'libs'}",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0 or not any((staging / "libs").glob("kafka_*.jar")):
                raise LocalServiceError(
                    f"Maven could not fetch the Kafka {kafka_version()} jars "
                    f"({_first_error(result.stdout + result.stderr)}); "
                    "check access to Maven Central (or ~/.m2/settings.xml) and try again"
                )
            if libs.exists():
                shutil.rmtree(libs)
            (staging / "libs").rename(libs)
            (root / _COMPLETE).write_text(f"kafka {kafka_version()}\n")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return libs


class PortTakenError(LocalServiceError):
    """A port the local Kafka needs is held by another process (before or while it started)."""

    def __init__(self, port: int) -> None:
        super().__init__(
            f"port {port} on 127.0.0.1 is taken by another process; "
            "stop it or choose another Kafka port"
        )
        self.port = port


def ports_in_use(ports: range) -> list[int]:
    """Those of `ports` on 127.0.0.1 that something holds right now."""
    return [port for port in ports if _port_in_use(port)]


def free_port_block(count: int) -> int:
    """A first port such that `count` consecutive ports on 127.0.0.1 are free right now.

    Chosen below the usual ephemeral range (32768 and up), where outgoing connections would not
    take one of them before the broker binds it.
    """
    first = 20000 + (os.getpid() * 17) % 10000
    candidates: list[int] = [*range(first, 32000 - count, count), *range(20000, first, count)]
    for base in candidates:
        if not any(_port_in_use(port) for port in range(base, base + count)):
            return base
    raise LocalServiceError(f"found no {count} free consecutive ports between 20000 and 32000")


@dataclass(frozen=True, kw_only=True)
class SaslSslListener:
    """A SASL_SSL listener that accepts SCRAM-SHA-512 logins over TLS, for one test broker.

    It opens on `port + 2` beside the PLAINTEXT listener (which the controller, the broker itself
    and test set-up keep using). `keystore` is a PKCS12 file holding the broker's key and
    certificate chain, for the name the clients dial (`127.0.0.1`), under `keystore_password`.
    `scram_users` (name -> password) are created with the StorageTool's `--add-scram` when the
    storage is formatted, so they exist before the first client connects. Names, passwords and
    the keystore password are letters, digits, `.`, `_` and `-` only: they are written unquoted
    into a command line and a properties file. This is a test broker: the passwords are visible
    in its properties file and, while it formats, in the process list.

    With `authorizer`, the broker runs KRaft's StandardAuthorizer, as a Strimzi cluster with
    `authorization: simple` does: a SCRAM user may do only what an ACL allows it. `super_users`
    (SCRAM names) may do anything; so may the PLAINTEXT and controller listeners' ANONYMOUS
    principal, which the broker and controller use themselves, and which makes the PLAINTEXT
    listener the test's admin door (creating topics and ACLs).
    """

    keystore: Path
    keystore_password: str
    scram_users: Mapping[str, str]
    authorizer: bool = False
    super_users: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        words = [self.keystore_password, *self.scram_users, *self.scram_users.values()]
        if not self.scram_users or not all(_PLAIN_WORD.fullmatch(word) for word in words):
            raise ValueError(
                "a SASL_SSL listener needs at least one SCRAM user, and names and passwords "
                "made of letters, digits, '.', '_' and '-'"
            )
        if self.super_users and not self.authorizer:
            raise ValueError("super users mean something only with the authorizer on")

    @staticmethod
    def listener(port: int) -> str:
        """The entry for `listeners` and `advertised.listeners`."""
        return f"SASL_SSL://127.0.0.1:{port}"

    def properties(self) -> dict[str, str]:
        """What the listener adds to a broker's configuration, besides its `listeners` entry."""
        prefix = "listener.name.sasl_ssl."
        return {
            f"{prefix}sasl.enabled.mechanisms": "SCRAM-SHA-512",
            f"{prefix}scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            f"{prefix}ssl.keystore.type": "PKCS12",
            f"{prefix}ssl.keystore.location": str(self.keystore.resolve()),
            f"{prefix}ssl.keystore.password": self.keystore_password,
            # The clients authenticate with SCRAM; no client certificate is asked for.
            f"{prefix}ssl.client.auth": "none",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            **self._authorizer_properties(),
        }

    def _authorizer_properties(self) -> dict[str, str]:
        if not self.authorizer:
            return {}
        supers = ["User:ANONYMOUS", *(f"User:{name}" for name in self.super_users)]
        return {
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": ";".join(supers),
            "allow.everyone.if.no.acl.found": "false",
        }

    def format_arguments(self) -> list[str]:
        """The StorageTool arguments that create the SCRAM users in the bootstrap metadata."""
        arguments: list[str] = []
        for name, password in self.scram_users.items():
            arguments += ["--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"]
        return arguments


def server_properties(
    *,
    node_index: int,
    nodes: int,
    port: int,
    data_dir: Path,
    sasl_ssl: SaslSslListener | None = None,
) -> dict[str, str]:
    """The broker configuration of node `node_index` (from 0) in a cluster of `nodes` (1 or 3),
    with a SASL_SSL listener on `port + 2` when `sasl_ssl` is given (a single node only)."""
    broker_port, controller_port = port + 2 * node_index, port + 2 * node_index + 1
    listeners = f"PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}"
    protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    secure: dict[str, str] = {}
    if sasl_ssl is not None:
        if nodes != 1:
            raise ValueError("a SASL_SSL listener is offered on a single-node cluster only")
        secure = sasl_ssl.properties()
        listeners += "," + sasl_ssl.listener(port + 2)
        protocols += ",SASL_SSL:SASL_SSL"
    properties = {
        "process.roles": "broker,controller",
        "node.id": str(node_index + 1),
        "listeners": listeners,
        "advertised.listeners": listeners,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": protocols,
        "log.dirs": str(data_dir),
        # Our code creates every topic it uses; a typo must fail, not create a topic.
        "auto.create.topics.enable": "false",
        "group.initial.rebalance.delay.ms": "0",
        # Tests use session timeouts of a few seconds (the default minimum is 6 s).
        "group.min.session.timeout.ms": "1000",
        **secure,
    }
    if nodes == 1:
        return properties | {
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
        }
    voters = ",".join(f"{i + 1}@127.0.0.1:{port + 2 * i + 1}" for i in range(nodes))
    return properties | {
        "controller.quorum.voters": voters,
        "default.replication.factor": "3",
        "min.insync.replicas": "2",
        "offsets.topic.replication.factor": "3",
        "transaction.state.log.replication.factor": "3",
        "transaction.state.log.min.isr": "2",
        # 50 partitions (the default) of each internal topic, times three, is slow on two cores.
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.num.partitions": "3",
        "num.io.threads": "2",
        "num.network.threads": "2",
        "background.threads": "2",
        # A killed node is fenced, and its partitions move, after 4 s instead of 9 s.
        "broker.session.timeout.ms": "4000",
        "broker.heartbeat.interval.ms": "500",
    }


@dataclass(kw_only=True)
class KafkaCluster:
    """One or three local Kafka JVMs under `state_dir`, detached from this process.

    `libs` is the jar directory; by default `ensure_kafka_jars()` provides it. With `sasl_ssl`
    (one node only) the broker also listens for SCRAM-SHA-512 over TLS on `port + 2`.
    Methods block; from async code call them through `asyncio.to_thread`.
    """

    state_dir: Path
    nodes: int = 1
    port: int = 9092
    heap_mb: int = 512
    libs: Path | None = None
    sasl_ssl: SaslSslListener | None = None

    def __post_init__(self) -> None:
        if self.nodes not in (1, 3):
            raise ValueError(f"a local Kafka cluster has 1 or 3 nodes, not {self.nodes}")
        if self.sasl_ssl is not None and self.nodes != 1:
            raise ValueError("a SASL_SSL listener is offered on a single-node cluster only")
        self.state_dir = self.state_dir.resolve()

    @property
    def ports(self) -> range:
        """Every port the cluster listens on: each node's broker and controller port, and the
        SASL_SSL port if there is one."""
        return range(self.port, self.port + 2 * self.nodes + (self.sasl_ssl is not None))

    @property
    def sasl_ssl_bootstrap_servers(self) -> str:
        """`127.0.0.1:<port + 2>`, the SASL_SSL listener; only with `sasl_ssl`."""
        if self.sasl_ssl is None:
            raise LocalServiceError("this Kafka cluster was configured without a SASL_SSL listener")
        return f"127.0.0.1:{self.port + 2}"

    @property
    def bootstrap_servers(self) -> str:
        """`127.0.0.1:<port>` of every node, comma-joined."""
        return ",".join(self._address(i) for i in range(self.nodes))

    def is_running(self) -> bool:
        """Every node's JVM is alive and the cluster answers a metadata request naming all."""
        if not all(self._pid(i) is not None for i in range(self.nodes)):
            return False
        return _cluster_answers(self.bootstrap_servers, expect=self._node_ids())

    def start(self, timeout: float = 120) -> None:
        """Start the cluster, unless it already runs; return once every broker answers.

        Storage is formatted afresh each time the JVMs are launched (the controller's checkpoint
        remembers host and port), so topics do not survive `stop()`.
        """
        if self.is_running():
            return
        java = _require_tool("java", f"{_INSTALL_JAVA} to run the local Kafka broker")
        libs = self.libs or ensure_kafka_jars()
        self.stop()
        busy = ports_in_use(self.ports)
        if busy:
            raise PortTakenError(busy[0])
        cluster_id = _random_cluster_id()
        for index in range(self.nodes):
            self._write_node_config(index)
        with ThreadPoolExecutor(max_workers=self.nodes) as pool:
            formats = [
                pool.submit(self._format, index, java, libs, cluster_id)
                for index in range(self.nodes)
            ]
            for formatted in formats:
                formatted.result()
        for index in range(self.nodes):
            self._launch(index, java, libs)
        try:
            self._wait_until_answering(list(range(self.nodes)), timeout)
        except LocalServiceError:
            self.stop(timeout=5)  # nothing half-started stays behind; the logs do
            raise

    def stop(self, timeout: float = 30) -> None:
        """Stop every node: SIGTERM, then SIGKILL what is left after `timeout`. Idempotent."""
        running = {i: pid for i in range(self.nodes) if (pid := self._pid(i)) is not None}
        for pid in running.values():
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(self._pid(i) for i in running):
            time.sleep(0.1)
        for index in running:
            self.kill_node(index)
        for index in range(self.nodes):
            self._pid_file(index).unlink(missing_ok=True)

    def kill_node(self, index: int) -> None:
        """SIGKILL node `index` (from 0) and wait until it is gone; nothing if it is not running."""
        self._check_index(index)
        pid = self._pid(index)
        if pid is not None:
            _signal(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self._pid(index) is not None:
                if time.monotonic() > deadline:
                    raise LocalServiceError(f"Kafka node {index} (pid {pid}) survived SIGKILL")
                time.sleep(0.05)
        self._pid_file(index).unlink(missing_ok=True)

    def start_node(self, index: int, timeout: float = 120) -> None:
        """Start node `index` again with its existing storage; return once it answers."""
        self._check_index(index)
        if self._pid(index) is not None:
            return
        if not (self._node_dir(index) / "data" / "meta.properties").exists():
            raise LocalServiceError(f"Kafka node {index} was never formatted; call start() first")
        java = _require_tool("java", f"{_INSTALL_JAVA} to run the local Kafka broker")
        self._launch(index, java, self.libs or ensure_kafka_jars())
        self._wait_until_answering([index], timeout)

    # Internals.

    def _node_ids(self) -> set[int]:
        return {i + 1 for i in range(self.nodes)}

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.nodes:
            raise IndexError(f"node index {index} is outside 0..{self.nodes - 1}")

    def _address(self, index: int) -> str:
        return f"127.0.0.1:{self.port + 2 * index}"

    def _node_dir(self, index: int) -> Path:
        return self.state_dir / f"node-{index}"

    def _properties_file(self, index: int) -> Path:
        return self._node_dir(index) / "server.properties"

    def _pid_file(self, index: int) -> Path:
        return self._node_dir(index) / "broker.pid"

    def _log_file(self, index: int) -> Path:
        return self._node_dir(index) / "broker.log"

    def _pid(self, index: int) -> int | None:
        """The recorded pid of node `index` if that process is alive and is this node's broker."""
        try:
            pid = int(self._pid_file(index).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _is_running(pid, str(self._properties_file(index))) else None

    def _write_node_config(self, index: int) -> None:
        node = self._node_dir(index)
        if node.exists():
            shutil.rmtree(node)
        (node / "data").mkdir(parents=True)
        properties = server_properties(
            node_index=index,
            nodes=self.nodes,
            port=self.port,
            data_dir=node / "data",
            sasl_ssl=self.sasl_ssl,
        )
        lines = [f"{key}={value}" for key, value in properties.items()]
        self._properties_file(index).write_text("\n".join(lines) + "\n")

    def _java_command(self, java: str, libs: Path, index: int, *, tool: bool) -> list[str]:
        if tool:
            # A run of a few seconds: the optimising compiler and a concurrent GC only cost time.
            memory = ["-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
        else:
            memory = [
                f"-Xms{min(self.heap_mb, 128)}m",
                f"-Xmx{self.heap_mb}m",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
            ]
            if self.nodes > 1:
                # Three JVMs warming up on two cores: the quick compiler alone starts the
                # cluster in 9-13 s instead of 16-20 s; failover tests need no peak speed.
                memory.append("-XX:TieredStopAtLevel=1")
        return [
            java,
            *memory,
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self._node_dir(index)}",
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            "-cp",
            str(libs / "*"),
        ]

    def _format(self, index: int, java: str, libs: Path, cluster_id: str) -> None:
        command = [
            *self._java_command(java, libs, index, tool=True),
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(self._properties_file(index)),
        ]
        # One node bootstraps its quorum from its own checkpoint; static voters take no flag.
        if self.nodes == 1:
            command.append("--standalone")
        if self.sasl_ssl is not None:
            command += self.sasl_ssl.format_arguments()
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise LocalServiceError(
                f"formatting Kafka storage for node {index} failed: "
                f"{_first_error(result.stdout + result.stderr)}"
            )

    def _launch(self, index: int, java: str, libs: Path) -> None:
        command = [
            *self._java_command(java, libs, index, tool=False),
            "kafka.Kafka",
            str(self._properties_file(index)),
        ]
        log = self._log_file(index)
        # posix_spawn in a new session, like Popen(start_new_session=True), but without a Popen
        # object: the broker outlives this process and nothing warns that it is still running.
        pid = os.posix_spawn(
            java,
            command,
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )
        _SPAWNED.add(pid)
        self._pid_file(index).write_text(f"{pid}\n")

    def _wait_until_answering(self, indexes: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        bootstrap = ",".join(self._address(i) for i in indexes)
        expect = {i + 1 for i in indexes}
        while True:
            for index in indexes:
                if self._pid(index) is None:
                    taken = self._port_taken_meanwhile(index)
                    if taken is not None:
                        raise PortTakenError(taken)
                    raise LocalServiceError(
                        f"Kafka node {index} exited while starting: {self._log_hint(index)}"
                    )
            listening = [self.port + 2 * i for i in indexes]
            if self.sasl_ssl is not None:
                listening.append(self.port + 2)
            if all(_accepts(port) for port in listening) and _cluster_answers(
                bootstrap, expect=expect
            ):
                return
            if time.monotonic() > deadline:
                raise LocalServiceError(
                    f"Kafka did not answer at {bootstrap} within {timeout:.0f} s: "
                    f"{self._log_hint(indexes[0])}"
                )
            time.sleep(_POLL_SECONDS)

    def _port_taken_meanwhile(self, index: int) -> int | None:
        """The port node `index` could not bind, if its log says so (taken after our check)."""
        try:
            text = self._log_file(index).read_text(errors="replace")
        except FileNotFoundError:
            return None
        found = re.search(r"failed to bind to [^\s]*?:(\d+)[^\n]*Address already in use", text)
        return int(found.group(1)) if found else None

    def _log_hint(self, index: int) -> str:
        log = self._log_file(index)
        try:
            lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
        except FileNotFoundError:
            return f"no log at {log}"
        tail = " | ".join([line[:200] for line in lines if line][-3:])
        return f"{tail or 'the log is empty'} (log: {log})"


# Brokers this process started: only these may be reaped with waitpid.
_SPAWNED: set[int] = set()


def _is_running(pid: int, marker: str) -> bool:
    """`pid` is alive and is the process we mean (a reused pid does not count)."""
    if pid in _SPAWNED:
        return _child_is_running(pid)
    return runs_with(pid, marker)


def _child_is_running(pid: int) -> bool:
    """For our own child waitpid is exact, and it reaps the zombie a dead child leaves behind."""
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        finished = pid
    if finished == 0:
        return True
    _SPAWNED.discard(pid)
    return False


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Java servers bind with SO_REUSEADDR too, so a socket in TIME_WAIT does not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _accepts(port: int) -> bool:
    """A TCP connection succeeds: checked first so the Kafka client never logs refusals."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _cluster_answers(bootstrap_servers: str, *, expect: set[int]) -> bool:
    """A metadata request to `bootstrap_servers` answers and lists every node id in `expect`."""
    return expect <= asyncio.run(_broker_ids(bootstrap_servers))


async def _broker_ids(bootstrap_servers: str) -> set[int]:
    from aiokafka.admin import AIOKafkaAdminClient  # noqa: PLC0415 - keeps `--help` fast
    from aiokafka.errors import KafkaError  # noqa: PLC0415

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=5000)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
    except (KafkaError, OSError, TimeoutError):
        return set()
    finally:
        await admin.close()
    return {int(broker["node_id"]) for broker in cluster["brokers"]}


def _random_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, as Kafka makes them."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka avoids these: they read as command-line flags
            return text


def _require_tool(name: str, install: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise LocalServiceError(f"`{name}` is not on PATH: {install}")
    return found


def _first_error(output: str) -> str:
    """The line of a tool's output that says what went wrong, without colours or prefixes."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", output)
    lines = [line.strip() for line in plain.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "Exception" in line]
    chosen = (errors or lines or ["no output"])[0]
    return chosen.removeprefix("[ERROR] ").removesuffix(" -> [Help 1]")[:300]
