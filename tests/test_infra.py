"""`loyalty up` / `down` / `status` as a user runs them: separate ports and state from the session's servers."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from infra import local
from support import clean_env, run_loyalty, wait_for

ROOT = Path(__file__).resolve().parents[1]


def our_processes(state_dir: Path, redis_port: int) -> list[str]:
    """Live (non-zombie) processes that belong to the state folder: its Kafka or its redis-server."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not local.pid_alive(int(proc.name)):
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ("kafka.Kafka" in cmdline and str(state_dir) in cmdline) or (
            "redis-server" in cmdline and f":{redis_port}" in cmdline
        ):
            found.append(f"{proc.name}: {cmdline}")
    return found


@dataclass
class User:
    """A user shell: clean environment, own state folder and free ports."""

    cwd: Path
    state_dir: Path
    env: dict[str, str]
    ports: dict[str, int]

    @property
    def up_args(self) -> tuple[str, ...]:
        return (
            "up", "--kafka-port", str(self.ports["kafka"]), "--controller-port", str(self.ports["controller"]),
            "--redis-port", str(self.ports["redis"]),
        )  # fmt: skip

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return run_loyalty(*args, env={**self.env, **env}, cwd=self.cwd)


@pytest.fixture
def user(tmp_path: Path) -> Iterator[User]:
    """A :class:`User`; whatever it started is stopped afterwards."""
    state_dir = tmp_path / "state"
    ports = {"kafka": local.free_port(), "controller": local.free_port(), "redis": local.free_port()}
    try:
        yield User(tmp_path, state_dir, clean_env(LOYALTY_STATE_DIR=str(state_dir)), ports)
    finally:
        local.down(state_dir, timeout=10)


def pids(state_dir: Path) -> tuple[int | None, int | None]:
    return local.LocalKafka(state_dir).running_pid(), local.LocalRedis(state_dir).running_pid()


def test_up_is_idempotent_and_down_leaves_nothing(user: User) -> None:
    first = user.run(*user.up_args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert re.search(r"^kafka\s+started", first.stdout, re.M), first.stdout
    assert re.search(r"^redis\s+started", first.stdout, re.M), first.stdout
    assert f"127.0.0.1:{user.ports['kafka']}" in first.stdout
    kafka_pid, redis_pid = pids(user.state_dir)
    assert kafka_pid and redis_pid
    assert local.kafka_ready(f"127.0.0.1:{user.ports['kafka']}")
    assert local.redis_ready(f"redis://127.0.0.1:{user.ports['redis']}/0")
    assert (user.state_dir / "kafka" / "logs" / "server.log").is_file()  # logs and data under the state folder
    # the JVM's own log beside it, as Kafka's scripts keep one: a broker's pauses are told from its stalls
    assert "Using G1" in (user.state_dir / "kafka" / "logs" / "kafka-gc.log").read_text()
    assert (user.state_dir / "kafka" / "data" / "meta.properties").is_file()

    second = user.run(*user.up_args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("already running") == 2, second.stdout
    assert pids(user.state_dir) == (kafka_pid, redis_pid)

    status = user.run("status")
    assert status.returncode == 0 and status.stdout.count("running") == 2, status.stdout

    down = user.run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not local.pid_alive(kafka_pid) and not local.pid_alive(redis_pid)
    assert our_processes(user.state_dir, user.ports["redis"]) == []
    assert all(local.port_free(port) for port in user.ports.values())
    assert pids(user.state_dir) == (None, None)

    again = user.run("down")
    assert again.returncode == 0 and again.stdout.count("not running") == 2, again.stdout

    # Up again on the same state folder: the formatted data is reused.
    third = user.run(*user.up_args)
    assert third.returncode == 0, third.stdout + third.stderr
    assert third.stdout.count("started") == 2, third.stdout
    assert local.kafka_ready(f"127.0.0.1:{user.ports['kafka']}")
    assert user.run("down").returncode == 0
    assert our_processes(user.state_dir, user.ports["redis"]) == []


def test_up_without_java_says_so_clearly(user: User) -> None:
    empty_bin = user.cwd / "bin"
    empty_bin.mkdir()
    result = user.run(*user.up_args, PATH=str(empty_bin))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "java was not found on PATH" in result.stderr, output
    assert "Traceback" not in output
    assert pids(user.state_dir) == (None, None)


def test_up_without_maven_and_jars_says_so_clearly(user: User) -> None:
    java = shutil.which("java")
    assert java, "java is needed by this test suite"
    bin_dir = user.cwd / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(java)
    result = user.run(*user.up_args, PATH=str(bin_dir), LOYALTY_KAFKA_JARS=str(user.cwd / "no-jars-yet"))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "mvn (Apache Maven) was not found on PATH" in result.stderr, output
    assert "Traceback" not in output
    assert pids(user.state_dir) == (None, None)


def test_up_starts_nothing_for_servers_configured_elsewhere(user: User) -> None:
    result = user.run(
        *user.up_args,
        PATH=str(user.cwd),  # no java, no redis-server: neither is needed
        KAFKA_BOOTSTRAP_SERVERS="kafka-1.example.invalid:9092,kafka-2.example.invalid:9092",
        REDIS_URL="rediss://:secret@redis.example.invalid:6380/0",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("external") == 2, result.stdout
    assert pids(user.state_dir) == (None, None)
    assert "secret" not in result.stdout + result.stderr


def test_up_starts_no_plaintext_kafka_for_a_secured_one_on_loopback(user: User) -> None:
    """A loopback Kafka with SASL_SSL settings is someone else's: `up` starts only plaintext servers."""
    result = user.run(
        *user.up_args,
        PATH=str(user.cwd),  # no java: none is needed
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{user.ports['kafka']}",
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_SASL_USERNAME="loyalty",
        KAFKA_SASL_PASSWORD="kafka-secret",
        REDIS_URL="rediss://:redis-secret@127.0.0.1:6380/0",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("external") == 2, result.stdout
    assert pids(user.state_dir) == (None, None)
    assert "secret" not in result.stdout + result.stderr


def test_invalid_configuration_is_reported_without_traceback(user: User) -> None:
    result = user.run("status", LOYALTY_WINDOWS="1h,90s")
    assert result.returncode != 0
    assert "invalid configuration" in result.stderr and "90s" in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_docker_compose_runs_the_pinned_kafka_version() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    assert f"apache/kafka:{local.kafka_version()}" in compose
    assert re.fullmatch(r"4\.\d+\.\d+", local.kafka_version())


def test_docker_compose_runs_existing_commands_with_documented_variables() -> None:
    """Without Docker: the compose file runs only existing `loyalty` commands, with variables from .env.example."""
    from streams.cli import main

    compose = (ROOT / "docker-compose.yml").read_text()
    commands = re.findall(r'command:\s*\["loyalty",\s*"([^"]+)"', compose)
    assert commands, "the compose file runs no loyalty command"
    assert set(commands) <= set(main.commands), sorted(set(commands) - set(main.commands))
    ours = set(re.findall(r"\b(LOYALTY_\w+|KAFKA_BOOTSTRAP_SERVERS|REDIS_URL)\b", compose))
    documented = set(re.findall(r"^#?\s*(\w+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    assert ours <= documented, sorted(ours - documented)


#: the Compose keys this file may use (a subset of the Compose specification's)
COMPOSE_TOP_LEVEL = {"name", "services", "volumes", "networks", "configs", "secrets"}
COMPOSE_SERVICE_KEYS = {"image", "build", "command", "entrypoint", "environment", "env_file", "ports", "volumes",
                        "depends_on", "healthcheck", "restart", "hostname", "networks", "working_dir", "user",
                        "labels", "expose"}
COMPOSE_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
COMPOSE_RESTART = {"no", "always", "on-failure", "unless-stopped"}
COMPOSE_DURATION = re.compile(r"(\d+(us|ms|s|m|h))+")


def test_docker_compose_file_is_well_formed_without_docker() -> None:
    """Without Docker: the compose file parses, and its services, dependencies, volumes and checks are consistent."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # resolves the anchors and ``<<`` merges
    assert {key for key in compose if not key.startswith("x-")} <= COMPOSE_TOP_LEVEL
    services, volumes = compose["services"], compose.get("volumes") or {}
    assert {"kafka", "redis", "worker", "dashboard"} <= set(services)
    for name, service in services.items():
        assert set(service) <= COMPOSE_SERVICE_KEYS, (name, sorted(set(service) - COMPOSE_SERVICE_KEYS))
        assert "image" in service or "build" in service, name
        command = service.get("command", [])
        assert isinstance(command, list) and all(isinstance(part, str) for part in command), name
        environment = service.get("environment", {})
        assert isinstance(environment, dict), name
        assert all(isinstance(value, str | int | float | bool) for value in environment.values()), name
        for port in service.get("ports", []):
            assert re.fullmatch(r"((\d{1,3}\.){3}\d{1,3}:)?\d+:\d+", str(port)), (name, port)
        for mount in service.get("volumes", []):
            source = str(mount).split(":")[0]
            assert source.startswith((".", "/")) or source in volumes, (name, mount)
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services and dependency != name, (name, dependency)
            assert spec["condition"] in COMPOSE_CONDITIONS, (name, spec)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
        check = service.get("healthcheck")
        if check is not None:
            assert check["test"][0] in {"CMD", "CMD-SHELL"} and len(check["test"]) > 1, name
            for key in ("interval", "timeout", "start_period"):
                assert key not in check or COMPOSE_DURATION.fullmatch(str(check[key])), (name, key)
        assert service.get("restart", "no") in COMPOSE_RESTART, name
    assert services["worker"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:19092"  # the merged anchor


def test_docker_compose_config_is_valid() -> None:
    """``docker compose config`` accepts the file; without Docker's Compose plugin, the loader it is built on
    (compose-go, ``infra/compose_check``) loads it instead, so the check runs on machines without Docker too."""
    docker = shutil.which("docker")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False) if docker else None
    if docker is not None and probe is not None and probe.returncode == 0:
        command = [docker, "compose", "config", "--quiet"]
        cwd = ROOT
    else:
        go = shutil.which("go")
        if go is None:
            pytest.fail("neither Docker's Compose plugin nor Go is installed: the compose file cannot be checked")
        command = [go, "run", ".", str(ROOT / "docker-compose.yml")]
        cwd = ROOT / "infra" / "compose_check"
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="parent-death signal: Linux only")
def test_a_process_started_with_exit_with_parent_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    """A child started with ``exit_with_parent`` (the tests' and the bench's workers) dies with a SIGKILLed parent."""
    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import subprocess, sys, time\n"
        "from infra.local import exit_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        "                         preexec_fn=exit_with_parent)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=ROOT)
    try:
        child_pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), timeout=30,
                                 message="the parent never started its child"))
        assert local.pid_alive(child_pid)
        parent.kill()
        parent.wait(timeout=10)
        wait_for(lambda: not local.pid_alive(child_pid), timeout=10, message="the child outlived its killed parent")
    finally:
        parent.kill()
