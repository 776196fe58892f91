"""Kafka behind SASL_SSL (SCRAM-SHA-512, a private CA) and Redis behind TLS and a password, end to end.

The servers are the session's ``secured_services`` (started once, only for this module's tests):
a Kafka whose one client listener is SASL_SSL and a redis-server with TLS only and a password.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from infra.local import SecuredServices, free_port
from metrics.events import INPUT_TOPICS, Event
from metrics.validation import parse_message
from streams.connections import async_redis
from streams.dashboard.server import HUB, create_app
from streams.settings import Settings
from streams.tools.history import generate_history, wire_body
from streams.tools.replay import plan_messages
from streams.worker.topics import ensure_topics
from support import async_wait_for, clean_env, group_is_stable, run_loyalty, stop_process, tail
from test_pipeline import FUTURE_MS, HORIZON, PARTITIONS, WINDOWS, redis_problems, reference_of, start_worker

REPLAY_BATCH = 100


def secured_env(secured: SecuredServices, tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A clean environment for ``loyalty`` commands on the secured servers (Redis database 1)."""
    client = secured.client_env()
    client["REDIS_URL"] = client["REDIS_URL"].rsplit("/", 1)[0] + "/1"
    return clean_env(**{**client, "LOYALTY_STATE_DIR": str(tmp_path / "state"), **overrides})


def settings_of(env: dict[str, str]) -> Settings:
    """The product's settings for ``env`` (what its commands read)."""
    return Settings(**{name: value for name, value in env.items() if name.startswith(("KAFKA_", "REDIS_", "LOYALTY_"))})


def history_file(tmp_path: Path) -> tuple[Path, list[Event]]:
    """A JSON-lines history for ``loyalty replay`` and its valid events as the worker will read them."""
    history = generate_history(stores=2, customers_per_store=150, days=40)
    path = tmp_path / "history.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(wire_body(event)) for event in history) + b"\n")
    messages, invalid, _ = plan_messages(path.read_bytes().splitlines(), REPLAY_BATCH)
    assert invalid == []
    valid = [
        item
        for topic, value in messages
        for item in parse_message(value, topic, now_ms=FUTURE_MS, max_future_skew_ms=300_000)
        if isinstance(item, Event)
    ]
    return path, valid


def secrets_of(secured: SecuredServices) -> list[str]:
    """The passwords that must never be printed or logged."""
    redis_password = secured.redis_url.split("://:", 1)[1].split("@", 1)[0]
    return [secured.kafka_password, redis_password]


async def dashboard_answers(settings: Settings, as_of_ms: int) -> None:
    """The dashboard on the TLS Redis: subscribed, healthy, and serving the snapshot as of ``as_of_ms``."""
    port = free_port()
    app = create_app(settings.model_copy(update={"dashboard_port": port}))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.wait_for(app[HUB].connected.wait(), timeout=10)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200
            async with session.get(f"{base}/api/snapshot", params={"store": "*", "window": "24h"}) as response:
                assert response.status == 200
                assert (await response.json())["as_of_ms"] == as_of_ms
    finally:
        await runner.cleanup()


@pytest.mark.timeout(420)
async def test_pipeline_over_sasl_ssl_kafka_and_tls_redis(secured_services, topic_prefix, app_id, tmp_path) -> None:
    """Replayed events through a worker on SCRAM-SHA-512 Kafka and TLS Redis equal the reference; no secret leaks."""
    secured: SecuredServices = secured_services
    path, valid = history_file(tmp_path)
    reference, as_of_ms, window_name = reference_of(valid)
    env = secured_env(
        secured, tmp_path,
        LOYALTY_APP_ID=app_id,
        LOYALTY_TOPIC_PREFIX=topic_prefix,
        LOYALTY_STORE="memory",
        LOYALTY_PARTITIONS=str(PARTITIONS),
        LOYALTY_CLOCK="event",
        LOYALTY_WINDOWS=",".join(WINDOWS),
        LOYALTY_ACTIVE_HORIZON=HORIZON,
        LOYALTY_EMIT_INTERVAL="200ms",
        LOYALTY_LOG_LEVEL="info",  # the most the worker says: none of it may be a secret
    )
    settings = settings_of(env)
    await ensure_topics(settings, [topic_prefix + name for name in INPUT_TOPICS], PARTITIONS)
    redis = async_redis(settings, decode_responses=True)
    await redis.flushdb()
    worker, log_path = start_worker(env, tmp_path, 0)
    last_problems: list[str] = []
    try:
        async def stable() -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"the worker exited with {worker.returncode}:\n{tail(log_path)}")
            return await group_is_stable(settings, app_id, 1)

        await async_wait_for(stable, timeout=120, interval=0.5,
                             message=lambda: f"the worker never joined its group\n{tail(log_path)}")
        started = time.monotonic()
        result = await asyncio.to_thread(
            run_loyalty, "replay", str(path), "--batch", str(REPLAY_BATCH), "--no-progress",
            env=env, cwd=tmp_path, timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr

        async def redis_matches() -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"the worker exited with {worker.returncode}:\n{tail(log_path)}")
            last_problems[:] = await redis_problems(redis, reference, as_of_ms, window_name)
            return not last_problems

        await async_wait_for(redis_matches, timeout=240, interval=0.5,
                             message=lambda: "\n".join(last_problems[:30]) + "\n" + tail(log_path))
        print(f"{len(valid)} valid events: Redis equal to the reference {time.monotonic() - started:.1f}s "
              "after the replay started")

        # the readers of Redis over TLS: `loyalty snapshot` and the dashboard (its client and its subscription)
        snapshot = await asyncio.to_thread(run_loyalty, "snapshot", "--json", env=env, cwd=tmp_path, timeout=60)
        assert snapshot.returncode == 0, snapshot.stdout + snapshot.stderr
        assert orjson.loads(snapshot.stdout)["*"]["24h"]["as_of_ms"] == as_of_ms
        await dashboard_answers(settings, as_of_ms)

        status = await asyncio.to_thread(run_loyalty, "status", env=env, cwd=tmp_path, timeout=60)
        shown = status.stdout + status.stderr
        assert "KAFKA_SASL_PASSWORD=***" in shown and "REDIS_URL=rediss://:***@" in shown, shown
        outputs = {"loyalty status": shown, "loyalty replay": result.stdout + result.stderr,
                   "loyalty snapshot": snapshot.stdout + snapshot.stderr}
    finally:
        stop_process(worker, timeout=60)
        await redis.aclose()
    outputs["worker log"] = log_path.read_text(errors="replace")
    assert '"level":"info"' in outputs["worker log"]  # the verbose log: none of it may be a secret
    for where, text in outputs.items():
        for secret in secrets_of(secured):
            assert secret not in text, f"a password appears in the {where}"


def refusal(result: Any, secret: str) -> str:
    """The one line a refused command printed, after checking it exited non-zero, without traceback or secret."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output and secret not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("command", ["worker", "replay"])
def test_wrong_kafka_password_is_a_clear_error(secured_services, tmp_path: Path, command: str) -> None:
    """A wrong SASL password stops the worker and the publisher at once, with one line naming authentication."""
    wrong = "not-the-password-" + "x" * 8
    env = secured_env(secured_services, tmp_path, KAFKA_SASL_PASSWORD=wrong, LOYALTY_TOPIC_PREFIX="refused-")
    path = tmp_path / "one.jsonl"
    path.write_text('{"event_id": "a", "type": "order.placed"}\n')
    args = ["worker"] if command == "worker" else ["replay", str(path), "--no-progress"]
    started = time.monotonic()
    line = refusal(run_loyalty(*args, env=env, cwd=tmp_path, timeout=90), wrong)
    assert "Kafka authentication failed" in line and "KAFKA_SASL_PASSWORD" in line, line
    assert time.monotonic() - started < 60


@pytest.mark.timeout(180)
def test_wrong_redis_password_is_a_clear_error(secured_services, tmp_path: Path) -> None:
    """A wrong password in REDIS_URL stops the worker and `loyalty snapshot` with one line naming authentication."""
    secured: SecuredServices = secured_services
    wrong = "not-the-redis-password"
    right = secrets_of(secured)[1]
    url = secured.redis_url.replace(f":{right}@", f":{wrong}@")
    env = secured_env(secured, tmp_path, REDIS_URL=url, LOYALTY_TOPIC_PREFIX="refused-")
    started = time.monotonic()
    line = refusal(run_loyalty("worker", env=env, cwd=tmp_path, timeout=90), wrong)
    assert "Redis authentication failed" in line and "rediss://:***@" in line, line
    snapshot = run_loyalty("snapshot", env=env, cwd=tmp_path, timeout=60)
    assert snapshot.returncode == 2
    assert "Redis authentication failed" in refusal(snapshot, wrong)
    assert time.monotonic() - started < 60


@pytest.mark.timeout(120)
def test_untrusted_kafka_certificate_is_a_clear_error(secured_services, tmp_path: Path) -> None:
    """Without the CA file the broker's certificate is not trusted: one line naming KAFKA_SSL_CAFILE."""
    env = secured_env(secured_services, tmp_path, LOYALTY_TOPIC_PREFIX="refused-")
    del env["KAFKA_SSL_CAFILE"]
    line = refusal(run_loyalty("worker", env=env, cwd=tmp_path, timeout=90), secured_services.kafka_password)
    assert "not trusted" in line and "KAFKA_SSL_CAFILE" in line, line
