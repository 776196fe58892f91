"""Checkpoints on the real Kafka and Redis: restarts read live state plus a tail, and a cut log is refused."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from infra.local import exit_with_parent, free_port
from metrics.compare import metric_differences
from metrics.reference import ReferenceConfig, accepted_events, reference_all
from metrics.timegrid import parse_duration
from metrics.validation import parse_message
from streams.settings import Settings
from streams.sinks.redis_sink import metric_key, parse_redis_field
from streams.tools.history import generate_history, wire_body
from streams.worker import checkpoints as checkpoints_module
from streams.worker.checkpoints import CheckpointError, Checkpoints
from streams.worker.topics import (
    STAR_PARTIALS_TOPIC,
    STAR_SAMPLES_TOPIC,
    ensure_pipeline_topics,
    ensure_topics,
    internal_topic,
)
from support import async_wait_for, clean_env, loyalty_command, stop_process, tail

PARTITIONS = 4
WINDOWS = ("1h", "24h", "7d", "30d")
HORIZON = "90d"
NOW_MS = 4_000_000_000_000  # validation's wall clock: after every history event


async def test_checkpoints_round_trip_in_chunks_and_clean_up_after_themselves(
    services: Any, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked checkpoints read back exactly; replaced and orphaned chunks are deleted; a missing chunk is an error."""
    monkeypatch.setattr(checkpoints_module, "CHUNK_BYTES", 1000)
    bootstrap = services.kafka_bootstrap
    topic = topic_prefix + "checkpoints"
    await ensure_topics(bootstrap, [topic], 2)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        writer = Checkpoints(producer, bootstrap, topic)
        first, second = os.urandom(3500), os.urandom(2500)
        await writer.write_store(1, "s|1", first, 10)
        await writer.write_store(1, "s|1", second, 20)  # the 4 chunks of the first are tombstoned
        await writer.write_store(1, "*", b"star", 20)
        await writer.write_store(1, "*", None, 25)  # unchanged: the same chunks stand for offset 25
        await writer.write_manifest(1, 20, 1_700_000_000_000, ["*", "s|1"])
        orphan = orjson.dumps(["c", 1, "s|1", "crashed-before-its-store-record", 0])
        await (await producer.send(topic, b"half a checkpoint", key=orphan, partition=1))

        reader = Checkpoints(producer, bootstrap, topic)
        restored = await reader.read([0, 1])
        assert restored[0].upto is None and restored[0].shards == {}
        assert (restored[1].upto, restored[1].clock_ms) == (20, 1_700_000_000_000)
        assert restored[1].shards == {"s|1": (20, second), "*": (25, b"star")}

        latest = await _latest_values(bootstrap, topic, 1)
        chunk_ids = {orjson.loads(key)[3] for key in latest if orjson.loads(key)[0] == "c"}
        assert chunk_ids == {reader.records[(1, "s|1")]["id"], reader.records[(1, "*")]["id"]}

        current = reader.records[(1, "s|1")]
        missing = orjson.dumps(["c", 1, "s|1", current["id"], 1])
        await (await producer.send(topic, None, key=missing, partition=1))
        with pytest.raises(CheckpointError, match="2 of its 3 chunks"):
            await Checkpoints(producer, bootstrap, topic).read([1])
    finally:
        await producer.stop()


async def _latest_values(bootstrap: str, topic: str, partition: int) -> dict[bytes, bytes]:
    """The latest non-tombstone value of each key of one partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    tp = TopicPartition(topic, partition)
    latest: dict[bytes, bytes] = {}
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                for record in records:
                    if record.value is None:
                        latest.pop(record.key, None)
                    else:
                        latest[record.key] = record.value
    finally:
        await consumer.stop()
    return latest


class Run:
    """One app id's topics, Redis database and worker processes, for the tests below."""

    def __init__(self, services: Any, topic_prefix: str, app_id: str, tmp_path: Path, database: int,
                 checkpoint_interval: str) -> None:
        self.bootstrap = services.kafka_bootstrap
        self.prefix = topic_prefix
        self.app_id = app_id
        self.tmp_path = tmp_path
        self.redis_url = services.redis_url.rsplit("/", 1)[0] + f"/{database}"
        self.env = clean_env(
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            REDIS_URL=self.redis_url,
            LOYALTY_APP_ID=app_id,
            LOYALTY_TOPIC_PREFIX=topic_prefix,
            LOYALTY_PARTITIONS=str(PARTITIONS),
            LOYALTY_CLOCK="event",
            LOYALTY_WINDOWS=",".join(WINDOWS),
            LOYALTY_ACTIVE_HORIZON=HORIZON,
            LOYALTY_EMIT_INTERVAL="200ms",
            LOYALTY_CHECKPOINT_INTERVAL=checkpoint_interval,
            LOYALTY_STATE_DIR=str(tmp_path / "state"),
            LOYALTY_LOG_LEVEL="info",
        )
        self.workers: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.deltas = f"{topic_prefix}{app_id}-deltas"

    def start_worker(self) -> subprocess.Popen[bytes]:
        log_path = self.tmp_path / f"worker-{len(self.workers)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*loyalty_command(), "worker"],
                env={**self.env, "LOYALTY_WEB_PORT": str(free_port())},
                cwd=self.tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=exit_with_parent,
            )
        self.workers.append((process, log_path))
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{tail(path, 30)}" for _, path in self.workers)

    def log_events(self, index: int, name: str) -> list[dict[str, Any]]:
        """The JSON log lines of worker ``index`` whose event is ``name``."""
        found = []
        for line in self.workers[index][1].read_bytes().splitlines():
            if name.encode() in line and line.startswith(b"{"):
                record = orjson.loads(line)
                if record.get("event") == name:
                    found.append(record)
        return found

    async def produce(self, events: list[Any]) -> None:
        await ensure_topics(self.bootstrap, [self.prefix + name for name in
                                             ("orders", "signups", "survey-responses", "marketing-spend",
                                              "loyalty-activity")], PARTITIONS)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            for start in range(0, len(events), 20):
                run = events[start:start + 20]
                for event in run:
                    await producer.send(self.prefix + event.topic, orjson.dumps(wire_body(event)))
            await producer.flush()
        finally:
            await producer.stop()

    async def deltas_offsets(self) -> tuple[dict[int, int], dict[int, int]]:
        """(beginning, end) offsets of the deltas partitions."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap)
        await consumer.start()
        try:
            tps = [TopicPartition(self.deltas, p) for p in range(PARTITIONS)]
            beginnings = await consumer.beginning_offsets(tps)
            ends = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
        return {tp.partition: o for tp, o in beginnings.items()}, {tp.partition: o for tp, o in ends.items()}

    def stop(self) -> None:
        for process, _ in self.workers:
            if process.poll() is None:
                stop_process(process, timeout=60)


def reference_of(events: list[Any]) -> tuple[dict[Any, Any], int]:
    valid = [item for event in events
             for item in parse_message(orjson.dumps(wire_body(event)), event.topic, now_ms=NOW_MS,
                                       max_future_skew_ms=300_000)]
    accepted = accepted_events(valid)
    as_of_ms = max(event.occurred_at_ms for event in accepted)
    windows_ms = tuple(parse_duration(w) for w in WINDOWS)
    reference = reference_all(accepted, windows_ms=windows_ms, as_of_ms=as_of_ms,
                              config=ReferenceConfig(bucket_ms=60_000, horizon_ms=parse_duration(HORIZON)))
    return reference, as_of_ms


async def wait_for_reference(run: Run, redis: aioredis.Redis, events: list[Any], timeout: float = 240) -> None:
    """Until every store and window in Redis equals the batch reference of ``events``."""
    reference, as_of_ms = reference_of(events)
    names = dict(zip((parse_duration(w) for w in WINDOWS), WINDOWS, strict=True))
    problems: list[str] = []

    async def matches() -> bool:
        for process, _ in run.workers[-1:]:
            if process.poll() is not None:
                raise AssertionError(f"the worker exited with {process.returncode}\n{run.logs()}")
        problems.clear()
        for (store, window_ms), expected in reference.items():
            stored = await redis.hgetall(metric_key(store, names[window_ms]))
            if stored.get("as_of_ms") != str(as_of_ms):
                problems.append(f"{store} {window_ms}: as_of_ms {stored.get('as_of_ms')} != {as_of_ms}")
                continue
            actual = {name: parse_redis_field(name, stored.get(name, "")) for name in expected}
            problems.extend(f"{store} {window_ms} {p}" for p in metric_differences(actual, expected))
        return not problems

    await async_wait_for(matches, timeout=timeout, interval=0.5,
                         message=lambda: "\n".join(problems[:20]) + "\n" + run.logs())


@pytest.mark.timeout(600)
async def test_a_restarted_worker_restores_checkpoints_and_folds_only_the_tail(
    services: Any, topic_prefix: str, app_id: str, tmp_path: Path
) -> None:
    """Checkpoints every second delete the deltas below them; a SIGKILLed worker restarts from them, exactly."""
    history = generate_history(stores=3, customers_per_store=150, days=60, seed=5)
    head, rest = history[: len(history) * 2 // 3], history[len(history) * 2 // 3:]
    run = Run(services, topic_prefix, app_id, tmp_path, database=2, checkpoint_interval="1s")
    redis = aioredis.Redis.from_url(run.redis_url, decode_responses=True)
    await redis.flushdb()
    try:
        run.start_worker()
        await run.produce(head)
        await wait_for_reference(run, redis, head)

        async def log_cut_below_a_checkpoint() -> bool:
            beginnings, ends = await run.deltas_offsets()
            return all(beginnings[p] > 0 for p in ends if ends[p] > 0)

        await async_wait_for(log_cut_below_a_checkpoint, timeout=60, interval=0.5,
                             message=lambda: f"the deltas log was never cut\n{run.logs()}")
        first = run.workers[0][0]
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        beginnings, _ = await run.deltas_offsets()
        await redis.flushdb()  # what is in Redis after the restart, the restarted worker published

        run.start_worker()
        await wait_for_reference(run, redis, head)  # everything published again, from the checkpoints
        (rebuilt, *_) = run.log_events(1, "aggregate.rebuilt")
        assert rebuilt["checkpointed"] > 0, rebuilt
        # the log below the checkpoints was gone: the restart folded only what came after them (deltas
        # the restarted facts stage sent again are among those, and skipped as applied)
        _, ends_now = await run.deltas_offsets()
        assert sum(beginnings.values()) > 0
        assert rebuilt["messages"] <= sum(ends_now.values()) - sum(beginnings.values())
        await run.produce(rest)
        await wait_for_reference(run, redis, history)
    finally:
        run.stop()
        await redis.aclose()


@pytest.mark.timeout(300)
async def test_a_deltas_log_cut_below_what_a_restore_needs_is_refused(
    services: Any, topic_prefix: str, app_id: str, tmp_path: Path
) -> None:
    """Deltas deleted with no checkpoint to stand for them: the restarted worker says so and publishes nothing."""
    history = generate_history(stores=2, customers_per_store=80, days=30, seed=9)
    run = Run(services, topic_prefix, app_id, tmp_path, database=3, checkpoint_interval="1h")
    redis = aioredis.Redis.from_url(run.redis_url, decode_responses=True)
    await redis.flushdb()
    try:
        run.start_worker()
        await run.produce(history)
        await wait_for_reference(run, redis, history)
        first = run.workers[0][0]
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        _, ends = await run.deltas_offsets()
        admin = AIOKafkaAdminClient(bootstrap_servers=run.bootstrap)
        await admin.start()
        try:  # as a retention limit would: the oldest half of every partition goes
            await admin.delete_records({TopicPartition(run.deltas, p): RecordsToDelete(before_offset=end // 2)
                                        for p, end in ends.items() if end > 1})
        finally:
            await admin.close()
        await redis.flushdb()

        run.start_worker()
        await async_wait_for(lambda: run.log_events(1, "aggregate.log_truncated"), timeout=120, interval=0.5,
                             message=lambda: f"the cut log was never refused\n{run.logs()}")
        # it keeps refusing (every emit tick) and never publishes the partitions it could not restore
        await async_wait_for(lambda: len(run.log_events(1, "aggregate.log_truncated")) >= 3, timeout=60,
                             interval=0.5, message=run.logs)
        assert await redis.keys("loyalty:store-*") == []
        assert run.workers[1][0].poll() is None, "the worker must stay up"
    finally:
        run.stop()
        await redis.aclose()


async def test_topics_deleted_or_compacted_by_the_worker_roll_small_segments(
    services: Any, topic_prefix: str, app_id: str
) -> None:
    """Each internal topic the worker deletes below an offset, or Kafka compacts, is created with small segments."""
    settings = Settings(_env_file=None, kafka_bootstrap_servers=services.kafka_bootstrap,  # type: ignore[call-arg]
                        topic_prefix=topic_prefix, app_id=app_id)
    await ensure_pipeline_topics(settings)
    deleted = ["events-by-store", "events-by-customer", "deltas", STAR_SAMPLES_TOPIC]
    compacted = ["checkpoints", STAR_PARTIALS_TOPIC]
    names = {internal_topic(settings, name): name for name in deleted + compacted}
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap)
    await admin.start()
    configs: dict[str, dict[str, str]] = {}

    async def described() -> bool:
        # a topic just created may be unknown to the broker that answers for a moment (an error code)
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic) for topic in names])
        resources = [resource for response in responses for resource in response.resources]
        configs.clear()
        configs.update({names[resource[3]]: {entry[0]: entry[1] for entry in resource[4]}
                        for resource in resources if resource[0] == 0})
        return len(configs) == len(names)

    try:
        await async_wait_for(described, timeout=30, interval=0.2, message=lambda: f"configs of {sorted(configs)}")
    finally:
        await admin.close()
    for name in deleted:
        # Kafka frees a whole closed segment at a time: a big one keeps deleted records on disk
        assert configs[name]["cleanup.policy"] == "delete", name
        assert int(configs[name]["segment.bytes"]) <= 8 * 1024 * 1024, name
    for name in compacted:
        # the cleaner compacts closed segments only: a restore reads the active one in full
        config = configs[name]
        assert config["cleanup.policy"] == "compact", name
        assert int(config["segment.ms"]) <= 60_000 and int(config["segment.bytes"]) <= 16 * 1024 * 1024, name
        assert float(config["min.cleanable.dirty.ratio"]) <= 0.1, name
