"""Helpers for tests that talk to the real Kafka, Redis and worker processes.

Never sleep a fixed time: wait on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from streams.connections import KafkaTarget, kafka_client_options
from streams.tools.demo import stop_worker

T = TypeVar("T")

# Variables a test's child process must not inherit from the developer's shell.
CONFIG_VARIABLES = (
    "KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "REDIS_SSL_CA_FILE", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE",
)


def wait_for(
    condition: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.1, message: str | Callable[[], str] = ""
) -> T:
    """Call ``condition`` until it returns something truthy (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"condition not met within {timeout:.0f}s: {text or condition!r}")
        time.sleep(interval)


async def async_wait_for(
    condition: Callable[[], Awaitable[T] | T],
    *,
    timeout: float = 30.0,
    interval: float = 0.1,
    message: str | Callable[[], str] = "",
) -> T:
    """:func:`wait_for` for coroutine functions (or plain callables) inside an event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"condition not met within {timeout:.0f}s: {text or condition!r}")
        await asyncio.sleep(interval)


def loyalty_command() -> list[str]:
    """How to run the installed ``loyalty`` console script of this environment."""
    script = Path(sys.executable).with_name("loyalty")
    return [str(script)] if script.exists() else [sys.executable, "-m", "streams.cli"]


def clean_env(**overrides: str) -> dict[str, str]:
    """The current environment without the product's configuration, plus ``overrides``.

    ``LOYALTY_PURE_PYTHON`` stays: it picks how the metrics run, not what they compute, so the
    processes a test starts run what the test session runs.
    """
    env = {k: v for k, v in os.environ.items()
           if k == "LOYALTY_PURE_PYTHON" or (k not in CONFIG_VARIABLES and not k.startswith("LOYALTY_"))}
    env.update(overrides)
    return env


def run_loyalty(
    *args: str, env: Mapping[str, str], cwd: Path, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """Run ``loyalty ARGS`` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [*loyalty_command(), *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code (the product's own way, ``loyalty demo``'s)."""
    return stop_worker(proc, timeout)


async def group_members(kafka: KafkaTarget, group: str) -> int:
    """How many members the consumer group has (in any state)."""
    admin = AIOKafkaAdminClient(**kafka_client_options(kafka))
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
        return len(response.groups[0][5])
    except KafkaError:
        return 0
    finally:
        await admin.close()


async def group_is_stable(kafka: KafkaTarget, group: str, members: int) -> bool:
    """Whether the consumer group is Stable with exactly ``members`` members (``kafka``: a bootstrap or settings)."""
    admin = AIOKafkaAdminClient(**kafka_client_options(kafka))
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
        _, _, state, _, _, group_members, *_ = response.groups[0]
        return bool(state == "Stable" and len(group_members) == members)
    except KafkaError:
        return False  # the group has no coordinator yet
    finally:
        await admin.close()


async def log_offsets(bootstrap: str, partitions: list[TopicPartition], beginning: bool) -> dict[TopicPartition, int]:
    """Each partition's first offset still in the log (``beginning``: moved by deleted records) or its end offset."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        return await (consumer.beginning_offsets(partitions) if beginning else consumer.end_offsets(partitions))
    finally:
        await consumer.stop()
