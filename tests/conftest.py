"""Session fixtures: the REAL Apache Kafka and redis-server, started once per test run.

They are started with the same code as ``loyalty up`` (``infra.local``), on free ports,
in a temporary state folder, and stopped at the end of the session. When
``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` are set, those servers are used instead and
nothing is started for them. A missing ``java`` or ``redis-server`` FAILS the tests that
need them (it never skips them).

``secured_services`` is a second pair, started only when a test asks for it (tests/test_security.py):
a Kafka whose one client listener is SASL_SSL with SCRAM-SHA-512 and a TLS-only Redis with a
password (``infra.local.up_secured``: certificates by openssl, SCRAM users added at format time).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra import local
from support import async_wait_for, wait_for


@dataclass(frozen=True)
class Services:
    """Where the session's Kafka and Redis listen."""

    kafka_bootstrap: str
    redis_url: str
    state_dir: Path


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """The real Kafka and Redis for this test session."""
    external_kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None
    external_redis = os.environ.get("REDIS_URL") or None
    state_dir = tmp_path_factory.mktemp("services")
    kafka_port, controller_port, redis_port = local.free_port(), local.free_port(), local.free_port()
    try:
        statuses = local.up(
            state_dir,
            kafka_port=kafka_port,
            controller_port=controller_port,
            redis_port=redis_port,
            external_kafka=external_kafka,
            external_redis=external_redis,
            timeout=180,
            die_with_parent=True,  # a killed test run leaves no JVM behind
        )
    except local.InfraError as exc:
        local.down(state_dir)
        pytest.fail(f"cannot start the real Kafka/Redis for the tests:\n{exc}", pytrace=False)
    kafka, redis = statuses
    if external_kafka and not local.kafka_ready(external_kafka, timeout=10):
        pytest.fail(f"KAFKA_BOOTSTRAP_SERVERS={external_kafka} does not answer a metadata request", pytrace=False)
    if external_redis and not local.redis_ready(external_redis, timeout=5):
        pytest.fail(f"REDIS_URL={external_redis} does not answer PING", pytrace=False)
    try:
        yield Services(kafka_bootstrap=kafka.address, redis_url=redis.address, state_dir=state_dir)
    finally:
        local.down(state_dir)


@pytest.fixture(scope="session")
def secured_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.SecuredServices]:
    """A Kafka with only a SASL_SSL (SCRAM-SHA-512) listener and a TLS Redis with a password, for this session."""
    state_dir = tmp_path_factory.mktemp("secured")
    started = time.monotonic()
    try:
        secured = local.up_secured(
            state_dir,
            kafka_port=local.free_port(),
            controller_port=local.free_port(),
            redis_port=local.free_port(),
            timeout=180,
            die_with_parent=True,
        )
    except local.InfraError as exc:
        local.down(state_dir)
        pytest.fail(f"cannot start the secured Kafka/Redis for the tests:\n{exc}", pytrace=False)
    print(f"secured Kafka and Redis up in {time.monotonic() - started:.1f}s")
    try:
        yield secured
    finally:
        local.down(state_dir)


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix no other test uses (``LOYALTY_TOPIC_PREFIX``)."""
    return f"t{uuid.uuid4().hex[:12]}-"


@pytest.fixture
def app_id() -> str:
    """A Faust app id / consumer group no other test uses (``LOYALTY_APP_ID``)."""
    return f"loyalty-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def wait_until():  # type: ignore[no-untyped-def]
    """``wait_until(condition, timeout=..., message=...)``: poll a condition instead of sleeping."""
    return wait_for


@pytest.fixture
def eventually():  # type: ignore[no-untyped-def]
    """``await eventually(async_condition, timeout=...)``: the async form of ``wait_until``."""
    return async_wait_for
