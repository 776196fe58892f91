"""End to end through the real pieces: Kafka topic -> a worker (the product's, plus a test agent) -> Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from infra.local import exit_with_parent, free_port
from support import async_wait_for, clean_env, stop_process, tail


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def test_worker_moves_events_from_kafka_to_redis(services, topic_prefix, app_id, tmp_path: Path) -> None:
    topic = f"{topic_prefix}loyalty-smoke"
    await create_topic(services.kafka_bootstrap, topic, partitions=2)
    env = clean_env(
        KAFKA_BOOTSTRAP_SERVERS=services.kafka_bootstrap,
        REDIS_URL=services.redis_url,
        LOYALTY_APP_ID=app_id,
        LOYALTY_TOPIC_PREFIX=topic_prefix,
        LOYALTY_STORE="memory",
        LOYALTY_PARTITIONS="2",
        LOYALTY_WEB_PORT=str(free_port()),
        LOYALTY_STATE_DIR=str(tmp_path / "state"),
        LOYALTY_LOG_LEVEL="info",
    )
    log_path = tmp_path / "worker.log"
    keys = {f"{topic_prefix}a": list(range(1, 11)), f"{topic_prefix}b": [5, 5, 5]}
    expected = {key: sum(ns) for key, ns in keys.items()}

    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("smoke_worker.py"))],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=exit_with_parent,
        )
    redis = aioredis.Redis.from_url(services.redis_url, decode_responses=True)
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        # A bad message first: the agent must log it and go on.
        await producer.send_and_wait(topic, b"this is not json", key=b"x")
        for key, ns in keys.items():
            for n in ns:
                await producer.send(topic, orjson.dumps({"key": key, "n": n}), key=key.encode())
        await producer.flush()

        async def all_counted() -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"worker exited with {worker.returncode}:\n{tail(log_path)}")
            values = await redis.mget([f"loyalty:smoke:{key}" for key in expected])
            return values == [str(v) for v in expected.values()]

        await async_wait_for(
            all_counted,
            timeout=120,
            interval=0.2,
            message=lambda: f"Redis never held {expected}; worker log:\n{tail(log_path)}",
        )
    finally:
        await producer.stop()
        await redis.aclose()
        code = stop_process(worker, timeout=60)
    assert code == 0, f"worker did not stop cleanly on SIGTERM (exit {code}):\n{tail(log_path)}"
