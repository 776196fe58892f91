"""Start and stop the local Apache Kafka (KRaft, single node) and redis-server of `loyalty up`.

Kafka runs from the official jars of Maven Central (``infra/pom.xml`` pins the version),
downloaded once with ``mvn dependency:copy-dependencies`` into ``infra/jars/kafka-<version>``
(or ``LOYALTY_KAFKA_JARS``),
formatted with ``kafka.tools.StorageTool format`` (static quorum) and started as
``java -cp <jars>/* kafka.Kafka server.properties`` in combined broker+controller mode.
Redis runs as ``redis-server`` on loopback without persistence.

Everything lives under one state folder (``LOYALTY_STATE_DIR``)::

    <state>/kafka/server.properties, cluster.id, kafka.pid, endpoint.json, data/, logs/, kafka.out
    <state>/redis/redis.pid, endpoint.json, redis.log, redis.out

A pid file names the process together with its start time, so a recycled pid is never
taken for ours. Starting is idempotent (a running service is reported, not restarted);
stopping sends SIGTERM, then SIGKILL after a timeout, and waits until the process is gone.
Problems a user can fix (no Java, no Maven, a busy port, a broker that dies at start)
raise :class:`InfraError` with a message meant to be printed as is.

A secured variant (:func:`up_secured`, for the tests; ``loyalty up`` does not use it) runs the
same Kafka with only a SASL_SSL client listener (SCRAM-SHA-512; its KRaft controller listener
stays PLAINTEXT on loopback) and redis-server with TLS only and a password, with a CA and
server certificate made by ``openssl`` under ``<state>/tls/`` and the SCRAM users created when
the storage is formatted (``kafka-storage format --add-scram``, with salted passwords).

Run ``python -m infra.local jars`` to download the jars (``make bootstrap`` does).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INFRA_DIR = Path(__file__).resolve().parent
POM = INFRA_DIR / "pom.xml"
LOG4J_CONFIG = INFRA_DIR / "log4j2.properties"
JARS_ROOT = INFRA_DIR / "jars"

LOOPBACK = "127.0.0.1"
DEFAULT_KAFKA_PORT = 9092
DEFAULT_REDIS_PORT = 6379
MIN_JAVA = 17
#: how often the broker frees segments wholly below a log's start (Kafka's default: every 5 minutes)
RETENTION_CHECK_INTERVAL_MS = 30_000

Echo = Callable[[str], None]


class InfraError(RuntimeError):
    """A problem the user can fix; the message is meant to be printed without a traceback."""


# -- tools -------------------------------------------------------------------------------------


def kafka_version() -> str:
    """The Kafka version pinned in ``infra/pom.xml`` (the one place it is written)."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise InfraError(f"{POM} has no <kafka.version> property")
    return (node.text or "").strip()


def jar_dir() -> Path:
    """Folder holding the Kafka class path (cached between runs, keyed by version).

    ``LOYALTY_KAFKA_JARS`` moves it (e.g. to a cache shared by several clones).
    """
    override = os.environ.get("LOYALTY_KAFKA_JARS")
    return Path(override).expanduser().absolute() if override else JARS_ROOT / f"kafka-{kafka_version()}"


def jars_present() -> bool:
    return (jar_dir() / ".complete").is_file()


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def find_java() -> str:
    """Path of a Java 17+ ``java``, or :class:`InfraError` saying how to get one."""
    java = shutil.which("java")
    if java is None:
        raise InfraError(
            f"java was not found on PATH: Kafka needs Java {MIN_JAVA} or newer "
            "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless), "
            "or set KAFKA_BOOTSTRAP_SERVERS to use a Kafka that runs elsewhere."
        )
    major = _java_major(java)
    if major is not None and major < MIN_JAVA:
        raise InfraError(f"{java} is Java {major}; Kafka {kafka_version()} needs Java {MIN_JAVA} or newer.")
    return java


def find_mvn() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError(
            f"mvn (Apache Maven) was not found on PATH: it is needed once to download the Kafka "
            f"{kafka_version()} jars (Debian/Ubuntu: apt-get install maven; or run `make bootstrap`)."
        )
    return mvn


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise InfraError(
            "redis-server was not found on PATH (Debian/Ubuntu: apt-get install redis-server; "
            "`make bootstrap` does it), or set REDIS_URL to use a Redis that runs elsewhere."
        )
    return path


def ensure_jars(echo: Echo = print) -> Path:
    """Download the Kafka jars with Maven unless they are already cached; return their folder."""
    target = jar_dir()
    if jars_present():
        return target
    mvn = find_mvn()
    echo(f"Downloading Apache Kafka {kafka_version()} jars with Maven (once) into {target} ...")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        mvn,
        "-B",
        "-q",
        "-Dstyle.color=never",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={tmp}",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise InfraError("mvn took over 20 minutes to download the Kafka jars: is Maven Central reachable?") from exc
    if out.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-20:])
        raise InfraError(f"mvn could not download the Kafka jars (exit {out.returncode}):\n{tail}")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    (target / ".complete").write_text(kafka_version() + "\n")
    return target


# -- certificates (the secured variant) ---------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate it signed (for 127.0.0.1 and localhost), PEM files."""

    ca_cert: Path
    cert: Path
    key: Path  #: the server's private key, unencrypted PKCS#8 (readable by us only)
    keystore: Path  #: key and certificate in one file (Kafka's PEM key store)


def find_openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        raise InfraError("openssl was not found on PATH: it makes the certificates (apt-get install openssl)")
    return path


def make_certificates(folder: Path, days: int = 825) -> TlsFiles:
    """A new CA and a server certificate signed by it under ``folder`` (kept when already there)."""
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "server-keystore.pem")
    if all(path.is_file() for path in (files.ca_cert, files.cert, files.key, files.keystore)):
        return files
    openssl = find_openssl()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ca_key, csr, ext = folder / "ca.key", folder / "server.csr", folder / "server.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        f"subjectAltName=IP:{LOOPBACK},DNS:localhost\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(files.ca_cert), "-days", str(days),
         "-subj", "/CN=loyalty local test CA"],
        [openssl, "req", *ec, "-keyout", str(files.key), "-out", str(csr), "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(files.ca_cert), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(files.cert), "-days", str(days), "-extfile", str(ext)],
    ]  # fmt: skip
    for cmd in steps:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            output = (out.stdout + out.stderr)[-2000:]
            raise InfraError(f"{' '.join(cmd[:3])} failed (exit {out.returncode}):\n{output}")
    files.keystore.touch(mode=0o600)
    files.keystore.write_text(files.key.read_text() + files.cert.read_text())
    for path in (ca_key, files.key):
        os.chmod(path, 0o600)
    return files


# -- processes ---------------------------------------------------------------------------------


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None when unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # exited, waiting to be reaped: gone for us
        return None
    return int(fields[19])


def exit_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this process when the process that started it dies; elsewhere nothing.

    For the processes of test sessions and benchmarks (``preexec_fn``): a session or bench that is
    killed must not leave workers behind that spin against a broker that is gone.
    """
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our own exited child (else a no-op)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (and, when given, started at ``start_time``: not a recycled pid)."""
    _reap(pid)
    if Path("/proc").is_dir():
        now = _proc_start_time(pid)
        return now is not None and (start_time is None or now == start_time)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate(pid: int, start_time: int | None = None, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the process is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        if not pid_alive(pid, start_time):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid, start_time):
                return
            time.sleep(0.1)
    if pid_alive(pid, start_time):
        raise InfraError(f"process {pid} did not exit after SIGKILL")


def port_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Silence client libraries while probing a server that is still starting (or a check explains a failure)."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@dataclass(frozen=True)
class Status:
    """What ``up``/``down``/``status`` did or found for one service."""

    name: str
    state: str  # started | running | stopped | not running | external
    address: str
    pid: int | None = None
    detail: str = ""

    def line(self) -> str:
        pid = f" (pid {self.pid})" if self.pid else ""
        detail = f" - {self.detail}" if self.detail else ""
        return f"{self.name:<6} {self.state:<12} {self.address}{pid}{detail}"


class _Service:
    """A local server process with a pid file and an endpoint file under ``<state>/<name>/``."""

    name = ""
    marker = ""  # a word of the process's command line (a last check before signalling it)

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir).absolute() / self.name
        self.pid_file = self.dir / f"{self.name}.pid"
        self.endpoint_file = self.dir / "endpoint.json"

    # pid file: "<pid> <start time>"
    def _read_pid(self) -> tuple[int, int | None] | None:
        try:
            parts = self.pid_file.read_text().split()
            return int(parts[0]), (int(parts[1]) if len(parts) > 1 else None)
        except (OSError, ValueError, IndexError):
            return None

    def running_pid(self) -> int | None:
        """Pid of our running process, or None (a stale pid file is removed)."""
        found = self._read_pid()
        if found is None:
            return None
        pid, start_time = found
        if pid_alive(pid, start_time) and self._looks_like_ours(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def _looks_like_ours(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return not Path("/proc").is_dir()
        return self.marker in cmdline

    def _write_pid(self, pid: int) -> None:
        start_time = _proc_start_time(pid)
        self.pid_file.write_text(f"{pid} {start_time if start_time is not None else ''}".strip() + "\n")

    def endpoint(self) -> dict[str, int]:
        try:
            data = json.loads(self.endpoint_file.read_text())
            return {str(k): int(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def stop(self, timeout: float = 30.0) -> Status:
        found = self._read_pid()
        pid = self.running_pid()
        address = self.address_of(self.endpoint())
        if pid is None:
            return Status(self.name, "not running", address)
        terminate(pid, found[1] if found else None, timeout=timeout)
        self.pid_file.unlink(missing_ok=True)
        return Status(self.name, "stopped", address, pid)

    def status(self) -> Status:
        pid = self.running_pid()
        address = self.address_of(self.endpoint())
        if pid is None:
            return Status(self.name, "not running", address)
        ready = self.probe(self.endpoint())
        return Status(self.name, "running", address, pid, "" if ready else "not answering")

    def _spawn(self, cmd: list[str], out_file: Path, die_with_parent: bool) -> subprocess.Popen[bytes]:
        with out_file.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,  # survives `loyalty up` and the terminal's Ctrl-C
                preexec_fn=exit_with_parent if die_with_parent else None,
            )
        self._write_pid(proc.pid)
        return proc

    def _wait_ready(self, proc: subprocess.Popen[bytes], endpoint: dict[str, int], timeout: float, logs: Path) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise InfraError(
                    f"{self.name} exited with code {proc.returncode} while starting; last lines of {logs}:\n"
                    f"{_tail(logs)}"
                )
            if self.probe(endpoint):
                return
            if time.monotonic() > deadline:
                terminate(proc.pid, timeout=10)
                proc.wait()
                self.pid_file.unlink(missing_ok=True)
                raise InfraError(
                    f"{self.name} did not become ready within {timeout:.0f}s; last lines of {logs}:\n{_tail(logs)}"
                )
            time.sleep(0.25)

    def _check_port(self, port: int, flag: str, env: str) -> None:
        if not port_free(port):
            raise InfraError(
                f"port {port} on {LOOPBACK} is already in use by a process loyalty did not start: "
                f"choose another with {flag}, or set {env} to use the server listening there."
            )

    # per service
    def address_of(self, endpoint: dict[str, int]) -> str:
        raise NotImplementedError

    def probe(self, endpoint: dict[str, int]) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class KafkaScram:
    """A SASL_SSL client listener with SCRAM-SHA-512: the broker's certificate and the SCRAM users."""

    tls: TlsFiles
    users: Mapping[str, str]  #: user -> password, created at format time; the first is the broker's own

    MECHANISM = "SCRAM-SHA-512"

    ITERATIONS = 4096

    @property
    def broker_user(self) -> str:
        return next(iter(self.users))

    def format_argument(self, user: str) -> str:
        """``--add-scram`` of the storage tool for ``user``: salted (RFC 5802), so no password is on a command line."""
        salt = secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha512", self.users[user].encode(), salt, self.ITERATIONS)
        encoded = {name: base64.b64encode(value).decode() for name, value in (("salt", salt), ("salted", salted))}
        return (
            f'{self.MECHANISM}=[name={user},iterations={self.ITERATIONS},salt="{encoded["salt"]}",'
            f'saltedpassword="{encoded["salted"]}"]'
        )

    def client_options(self, user: str | None = None) -> dict[str, Any]:
        """aiokafka keyword arguments for ``user`` (default: the broker's own user)."""
        import ssl

        user = user or self.broker_user
        return {
            "security_protocol": "SASL_SSL",
            "ssl_context": ssl.create_default_context(cafile=str(self.tls.ca_cert)),
            "sasl_mechanism": self.MECHANISM,
            "sasl_plain_username": user,
            "sasl_plain_password": self.users[user],
        }


class LocalKafka(_Service):
    """Single-node KRaft Kafka (combined broker+controller, static quorum); SASL_SSL only with ``scram``."""

    name = "kafka"
    marker = "kafka.Kafka"

    def __init__(self, state_dir: Path, heap: str = "512m", scram: KafkaScram | None = None) -> None:
        super().__init__(state_dir)
        self.heap = heap
        self.scram = scram
        self.props_file = self.dir / "server.properties"
        self.data_dir = self.dir / "data"
        self.logs_dir = self.dir / "logs"
        self.out_file = self.dir / "kafka.out"
        self.cluster_id_file = self.dir / "cluster.id"

    def address_of(self, endpoint: dict[str, int]) -> str:
        return f"{LOOPBACK}:{endpoint.get('port', DEFAULT_KAFKA_PORT)}"

    def probe(self, endpoint: dict[str, int]) -> bool:
        options = self.scram.client_options() if self.scram is not None else {}
        return kafka_ready(self.address_of(endpoint), **options)

    def _java_cmd(self, java: str, jars: Path, *args: str) -> list[str]:
        return [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            "-cp",
            f"{jars}{os.sep}*",
            *args,
        ]

    def _gc_log(self) -> list[str]:
        """The broker's garbage-collection log (``logs/kafka-gc.log``), as Kafka's own start scripts
        keep one: a broker that stalls for a second is told apart from a pause of its JVM."""
        return [f"-Xlog:gc*:file=\"{self.logs_dir / 'kafka-gc.log'}\":time,uptime,level,tags:filecount=4,filesize=20M"]

    def _listeners(self, port: int, controller_port: int) -> list[str]:
        if self.scram is None:
            return [
                f"listeners=PLAINTEXT://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{controller_port}",
                f"advertised.listeners=PLAINTEXT://{LOOPBACK}:{port}",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            ]
        # clients and the broker itself (inter-broker) authenticate with SCRAM over TLS; the KRaft
        # controller listener stays PLAINTEXT on loopback
        mechanism, tls, user = self.scram.MECHANISM, self.scram.tls, self.scram.broker_user
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{user}" password="{self.scram.users[user]}";'
        )
        return [
            f"listeners=SASL_SSL://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{controller_port}",
            f"advertised.listeners=SASL_SSL://{LOOPBACK}:{port}",
            "inter.broker.listener.name=SASL_SSL",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
            f"sasl.enabled.mechanisms={mechanism}",
            f"sasl.mechanism.inter.broker.protocol={mechanism}",
            f"listener.name.sasl_ssl.{mechanism.lower()}.sasl.jaas.config={jaas}",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={tls.keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={tls.ca_cert}",
            "ssl.client.auth=none",
        ]

    def _properties(self, port: int, controller_port: int) -> str:
        return "\n".join(
            [
                "# Written by `loyalty up` (infra/local.py); rewritten at every start.",
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@{LOOPBACK}:{controller_port}",
                *self._listeners(port, controller_port),
                "controller.listener.names=CONTROLLER",
                f"log.dirs={self.data_dir}",
                "num.partitions=1",
                "default.replication.factor=1",
                "min.insync.replicas=1",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=10",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=10",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "auto.create.topics.enable=true",
                "delete.topic.enable=true",
                "log.retention.hours=168",
                # the worker deletes its internal topics below offsets it no longer needs; the broker
                # frees the segments wholly below a log's start only at this check (default 5 min)
                f"log.retention.check.interval.ms={RETENTION_CHECK_INTERVAL_MS}",
                "",
            ]
        )

    def _cluster_id(self) -> str:
        try:
            existing = self.cluster_id_file.read_text().strip()
        except OSError:
            existing = ""
        if existing:
            return existing
        while True:  # Kafka's own ids never start with "-" (it reads like a flag)
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            if not cluster_id.startswith("-"):
                break
        self.cluster_id_file.write_text(cluster_id + "\n")
        return cluster_id

    def _format(self, java: str, jars: Path) -> None:
        meta = self.data_dir / "meta.properties"
        if meta.is_file():
            text = meta.read_text()
            if f"cluster.id={self._cluster_id()}" in text:
                return  # formatted before: reuse the data
            shutil.rmtree(self.data_dir)  # foreign or broken data: reformat cleanly
        cmd = self._java_cmd(
            java, jars, "kafka.tools.StorageTool", "format", "-t", self._cluster_id(), "-c", str(self.props_file), "-g"
        )
        if self.scram is not None:  # the SCRAM users, written into the metadata log at format time (KRaft)
            for user in self.scram.users:
                cmd += ["--add-scram", self.scram.format_argument(user)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            output = (out.stdout + out.stderr)[-3000:]
            raise InfraError(f"kafka storage format failed (exit {out.returncode}):\n{output}")

    def start(
        self, port: int, controller_port: int, timeout: float = 120.0, echo: Echo = print, die_with_parent: bool = False
    ) -> Status:
        pid = self.running_pid()
        if pid is not None:
            endpoint = self.endpoint()
            note = "already running"
            if endpoint.get("port") != port:
                note += f"; --kafka-port {port} ignored (run `loyalty down` first to move it)"
            return Status(self.name, "running", self.address_of(endpoint), pid, note)
        java = find_java()
        jars = ensure_jars(echo)
        self._check_port(port, "--kafka-port", "KAFKA_BOOTSTRAP_SERVERS")
        self._check_port(controller_port, "--controller-port", "KAFKA_BOOTSTRAP_SERVERS")
        for folder in (self.dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.props_file.touch(mode=0o600)  # with SCRAM it holds the broker's password
        self.props_file.write_text(self._properties(port, controller_port))
        self._format(java, jars)
        endpoint = {"port": port, "controller_port": controller_port}
        self.endpoint_file.write_text(json.dumps(endpoint) + "\n")
        cmd = self._java_cmd(java, jars, *self._gc_log(), "kafka.Kafka", str(self.props_file))
        proc = self._spawn(cmd, self.out_file, die_with_parent)
        self._wait_ready(proc, endpoint, timeout, self.logs_dir / "server.log")
        return Status(self.name, "started", self.address_of(endpoint), proc.pid, f"Kafka {kafka_version()}")


@dataclass(frozen=True)
class RedisTls:
    """TLS only (no plain port) and a password."""

    tls: TlsFiles
    password: str


class LocalRedis(_Service):
    """redis-server on loopback, no persistence; TLS only and a password with ``secured``."""

    name = "redis"
    marker = "redis-server"

    def __init__(self, state_dir: Path, secured: RedisTls | None = None) -> None:
        super().__init__(state_dir)
        self.secured = secured
        self.log_file = self.dir / "redis.log"
        self.out_file = self.dir / "redis.out"
        self.conf_file = self.dir / "redis.conf"

    def address_of(self, endpoint: dict[str, int]) -> str:
        scheme = "rediss" if self.secured is not None else "redis"
        return f"{scheme}://{LOOPBACK}:{endpoint.get('port', DEFAULT_REDIS_PORT)}/0"

    def url_with_password(self, endpoint: dict[str, int]) -> str:
        """The address with the password (``rediss://:PASSWORD@...``): for clients, never for output."""
        address = self.address_of(endpoint)
        if self.secured is None:
            return address
        scheme, rest = address.split("://", 1)
        return f"{scheme}://:{self.secured.password}@{rest}"

    def probe(self, endpoint: dict[str, int]) -> bool:
        ca_file = self.secured.tls.ca_cert if self.secured is not None else None
        return redis_ready(self.url_with_password(endpoint), ca_file=ca_file)

    def _secured_args(self, port: int) -> list[str]:
        """The TLS settings and the password go in a config file only we can read, not on the command line."""
        assert self.secured is not None
        tls = self.secured.tls
        self.conf_file.touch(mode=0o600)
        self.conf_file.write_text(
            "# Written by infra/local.py (secured Redis); rewritten at every start.\n"
            f"requirepass {self.secured.password}\n"
            "port 0\n"
            f"tls-port {port}\n"
            f"tls-cert-file {tls.cert}\n"
            f"tls-key-file {tls.key}\n"
            f"tls-ca-cert-file {tls.ca_cert}\n"
            "tls-auth-clients no\n"
        )
        return [str(self.conf_file)]

    def start(self, port: int, timeout: float = 30.0, die_with_parent: bool = False) -> Status:
        pid = self.running_pid()
        if pid is not None:
            endpoint = self.endpoint()
            note = "already running"
            if endpoint.get("port") != port:
                note += f"; --redis-port {port} ignored (run `loyalty down` first to move it)"
            return Status(self.name, "running", self.address_of(endpoint), pid, note)
        server = find_redis_server()
        self._check_port(port, "--redis-port", "REDIS_URL")
        self.dir.mkdir(parents=True, exist_ok=True)
        endpoint = {"port": port}
        self.endpoint_file.write_text(json.dumps(endpoint) + "\n")
        config = self._secured_args(port) if self.secured is not None else []
        port_args = [] if self.secured is not None else ["--port", str(port)]
        cmd = [
            server,
            *config,
            "--bind", LOOPBACK,
            *port_args,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--dir", str(self.dir),
            "--logfile", str(self.log_file),
        ]  # fmt: skip
        proc = self._spawn(cmd, self.out_file, die_with_parent)
        self._wait_ready(proc, endpoint, timeout, self.log_file)
        detail = "no persistence" + (", TLS and a password" if self.secured is not None else "")
        return Status(self.name, "started", self.address_of(endpoint), proc.pid, detail)


# -- readiness ---------------------------------------------------------------------------------


def kafka_ready(bootstrap: str, timeout: float = 5.0, **client_options: Any) -> bool:
    """Whether the Kafka at ``bootstrap`` answers a metadata request with a broker and a controller.

    ``client_options``: aiokafka's security keyword arguments (``security_protocol``, ``sasl_*``, ``ssl_context``).
    """

    async def probe() -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000), **client_options
        )
        try:
            await asyncio.wait_for(admin.start(), timeout)
            cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
            return bool(cluster.get("brokers")) and cluster.get("controller_id", -1) != -1
        finally:
            await admin.close()

    with quiet("aiokafka"):
        try:
            return asyncio.run(probe())
        except Exception:
            return False


def redis_ready(url: str, timeout: float = 2.0, ca_file: Path | None = None) -> bool:
    """Whether the Redis at ``url`` answers PING (``rediss://``: trusting ``ca_file``)."""
    import redis

    tls = {"ssl_ca_certs": str(ca_file)} if ca_file is not None else {}
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout, **tls)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


# -- the commands ------------------------------------------------------------------------------


def up(
    state_dir: Path,
    *,
    kafka_port: int = DEFAULT_KAFKA_PORT,
    controller_port: int | None = None,
    redis_port: int = DEFAULT_REDIS_PORT,
    external_kafka: str | None = None,
    external_redis: str | None = None,
    timeout: float = 120.0,
    echo: Echo = print,
    die_with_parent: bool = False,
) -> list[Status]:
    """Start what is not running yet and wait until it answers.

    ``external_kafka``/``external_redis`` name servers that run elsewhere: nothing is started for them.
    Every missing tool is reported before anything starts. ``die_with_parent`` (for test sessions)
    makes the servers stop when the calling process dies, even when it is killed.
    """
    problems = []
    if external_kafka is None:
        for check in (find_java, (lambda: None) if jars_present() else find_mvn):
            try:
                check()
            except InfraError as exc:
                problems.append(str(exc))
    if external_redis is None:
        try:
            find_redis_server()
        except InfraError as exc:
            problems.append(str(exc))
    if problems:
        raise InfraError("\n".join(problems))

    statuses = []
    if external_kafka is not None:
        statuses.append(Status("kafka", "external", external_kafka, detail="KAFKA_BOOTSTRAP_SERVERS: not started"))
    else:
        kafka = LocalKafka(state_dir)
        statuses.append(
            kafka.start(
                kafka_port,
                controller_port or kafka_port + 1,
                timeout=timeout,
                echo=echo,
                die_with_parent=die_with_parent,
            )
        )
    if external_redis is not None:
        statuses.append(Status("redis", "external", external_redis, detail="REDIS_URL: not started"))
    else:
        statuses.append(
            LocalRedis(state_dir).start(redis_port, timeout=min(timeout, 60.0), die_with_parent=die_with_parent)
        )
    return statuses


@dataclass(frozen=True)
class SecuredServices:
    """Where the secured Kafka and Redis of :func:`up_secured` listen, and how to log in."""

    kafka_bootstrap: str
    kafka_user: str
    kafka_password: str
    redis_url: str  #: ``rediss://:PASSWORD@127.0.0.1:PORT/0``
    ca_file: Path
    statuses: tuple[Status, ...]

    MECHANISM = KafkaScram.MECHANISM

    def client_env(self) -> dict[str, str]:
        """The product's variables for a client of these servers."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": self.MECHANISM,
            "KAFKA_SASL_USERNAME": self.kafka_user,
            "KAFKA_SASL_PASSWORD": self.kafka_password,
            "KAFKA_SSL_CAFILE": str(self.ca_file),
            "REDIS_URL": self.redis_url,
            "REDIS_SSL_CA_FILE": str(self.ca_file),
        }


def _secrets(state_dir: Path) -> dict[str, str]:
    """The passwords of the secured servers: made once, kept in ``<state>/secrets.json`` (readable by us only)."""
    path = Path(state_dir) / "secrets.json"
    try:
        return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        pass
    made = {name: secrets.token_urlsafe(18) for name in ("broker", "client", "redis")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(made) + "\n")
    return made


def secured_services(state_dir: Path, client_user: str = "loyalty") -> tuple[LocalKafka, LocalRedis, str]:
    """The secured Kafka and Redis of ``state_dir`` (certificates, passwords made when missing), and the client user."""
    state_dir = Path(state_dir).absolute()
    tls = make_certificates(state_dir / "tls")
    passwords = _secrets(state_dir)
    scram = KafkaScram(tls, {"broker": passwords["broker"], client_user: passwords["client"]})
    return LocalKafka(state_dir, scram=scram), LocalRedis(state_dir, RedisTls(tls, passwords["redis"])), client_user


def up_secured(
    state_dir: Path,
    *,
    kafka_port: int,
    controller_port: int,
    redis_port: int,
    timeout: float = 120.0,
    echo: Echo = print,
    die_with_parent: bool = False,
) -> SecuredServices:
    """Start a Kafka with only a SASL_SSL (SCRAM-SHA-512) client listener and a TLS-only Redis with a password.

    The CA and server certificate (``<state>/tls/``, by openssl) and the passwords (``<state>/secrets.json``)
    are made on the first start; the SCRAM users (the broker's own and the client's) are written when the
    storage is formatted. Stop them with :func:`down` on the same ``state_dir``.
    """
    problems = []
    for check in (find_java, find_redis_server, find_openssl, (lambda: None) if jars_present() else find_mvn):
        try:
            check()
        except InfraError as exc:
            problems.append(str(exc))
    if problems:
        raise InfraError("\n".join(problems))
    kafka, redis, user = secured_services(state_dir)
    assert kafka.scram is not None and redis.secured is not None
    statuses = (
        kafka.start(kafka_port, controller_port, timeout=timeout, echo=echo, die_with_parent=die_with_parent),
        redis.start(redis_port, timeout=min(timeout, 60.0), die_with_parent=die_with_parent),
    )
    return SecuredServices(
        kafka_bootstrap=statuses[0].address,
        kafka_user=user,
        kafka_password=kafka.scram.users[user],
        redis_url=redis.url_with_password(redis.endpoint()),
        ca_file=kafka.scram.tls.ca_cert,
        statuses=statuses,
    )


def down(state_dir: Path, *, timeout: float = 30.0) -> list[Status]:
    """Stop the Kafka and Redis that ``up`` started from ``state_dir`` (nothing else)."""
    return [LocalRedis(state_dir).stop(timeout), LocalKafka(state_dir).stop(timeout)]


def status(state_dir: Path) -> list[Status]:
    return [LocalKafka(state_dir).status(), LocalRedis(state_dir).status()]


def _main(argv: list[str]) -> int:
    if argv[1:] != ["jars"]:
        print("usage: python -m infra.local jars   # download the Kafka jars (cached)", file=sys.stderr)
        return 2
    try:
        path = ensure_jars()
    except InfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Kafka {kafka_version()} jars: {path} ({len(list(path.glob('*.jar')))} jars)")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv))
