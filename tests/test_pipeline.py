"""The whole pipeline on the real Kafka and Redis equals the batch reference, with one or two workers."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.local import exit_with_parent, free_port
from metrics.compare import cohort_differences, metric_differences
from metrics.events import MONEY_TYPES, Event
from metrics.reference import ReferenceConfig, accepted_events, reference_all, reference_cohorts_all
from metrics.timegrid import DAY_MS, parse_duration
from metrics.validation import parse_message
from streams.sinks.redis_sink import metric_key, parse_redis_field
from streams.tools.history import generate_history, wire_body
from streams.worker.topics import ensure_topics
from support import (
    async_wait_for,
    clean_env,
    group_is_stable,
    group_members,
    log_offsets,
    loyalty_command,
    stop_process,
    tail,
)

PARTITIONS = 4
WINDOWS = ("1h", "24h", "7d", "30d")
HORIZON = "90d"
FUTURE_MS = 4_000_000_000_000  # year 2096: beyond any skew


def invalid_messages() -> list[tuple[str, bytes | None, list[str]]]:
    """(topic, value, expected dead-letter reasons) for every kind of bad input, twice over."""
    good = {"event_id": "x", "type": "order.placed", "occurred_at": 1_700_100_000_000, "store_id": "store-1",
            "customer_id": "c", "order_id": "o", "amount": "5.00", "currency": "EUR"}

    def order(**changes: Any) -> bytes:
        body = {**good, **changes}
        return orjson.dumps({k: v for k, v in body.items() if v is not None})

    kinds: list[tuple[str, bytes | None, list[str]]] = [
        ("orders", b"this is not json", ["invalid_json"]),
        ("orders", b'"a string"', ["not_an_object"]),
        ("orders", b"[]", ["empty_batch"]),
        ("orders", b"[1,2,3]", ["not_an_object"] * 3),
        ("orders", None, ["null_message"]),
        ("orders", order(event_id=None), ["missing_field"]),
        ("orders", order(amount="-5"), ["bad_amount"]),
        ("orders", order(currency="eur"), ["bad_currency"]),
        ("orders", order(type="customer.signed_up"), ["wrong_topic"]),
        ("signups", order(type="customer.exploded"), ["unknown_type"]),
        ("survey-responses", order(type="survey.responded", survey="nps", score=11), ["out_of_range"]),
        ("survey-responses", order(type="survey.responded", survey="xyz", score=1), ["unknown_survey"]),
        ("orders", order(occurred_at="yesterday"), ["bad_timestamp"]),
        ("orders", order(occurred_at=FUTURE_MS), ["future_event"]),
        ("loyalty-activity", order(type="loyalty.reward_issued", reward_id="r", points="many"), ["wrong_type"]),
        ("orders", order(padding="x" * 70_000), ["message_too_large"]),
        # near Kafka's 1 MiB message limit: its dead letter (base64) is larger than that
        ("orders", b"{not json" + b"x" * 1_000_000, ["message_too_large"]),
        ("orders", order(store_id="*"), ["reserved_store_id"]),
    ]
    messages = []
    for copy in range(2):
        for index, (topic, value, reasons) in enumerate(kinds):
            if value is not None and value.startswith(b"{"):
                value = value.replace(b'"event_id":"x"', f'"event_id":"bad-{copy}-{index}"'.encode())
            messages.append((topic, value, reasons))
    return messages


def mixed_batch(copy: int) -> tuple[bytes, list[str]]:
    """A batch whose middle element is invalid: the other two still count."""
    spend = {"type": "spend.recorded", "occurred_at": 1_700_200_000_000, "store_id": "store-1",
             "amount": "12.34", "currency": "EUR", "channel": "search"}
    elements = [
        {**spend, "event_id": f"mixed-{copy}-a"},
        {**spend, "event_id": f"mixed-{copy}-b", "store_id": None},
        {**spend, "event_id": f"mixed-{copy}-c"},
    ]
    return orjson.dumps(elements), ["missing_field"]


def packed_history(history: list[Any]) -> list[tuple[str, bytes]]:
    """The history as input messages: mostly one event per message, some runs of a topic packed in batches."""
    messages: list[tuple[str, bytes]] = []
    index = 0
    while index < len(history):
        topic = history[index].topic
        run = 1
        if index % 7 == 0:
            while run < 40 and index + run < len(history) and history[index + run].topic == topic:
                run += 1
        bodies = [wire_body(event) for event in history[index:index + run]]
        messages.append((topic, orjson.dumps(bodies if run > 1 else bodies[0])))
        index += run
    return messages


def produce_plan() -> tuple[list[tuple[str, bytes | None]], Counter[str], list[Event]]:
    """Messages in production order, the expected dead-letter reasons, and the valid events in that order."""
    history = generate_history(customers_per_store=1400, days=120)
    messages: list[tuple[str, bytes | None]] = list(packed_history(history))
    expected_reasons: Counter[str] = Counter()
    for topic, value, reasons in invalid_messages():
        messages.append((topic, value))
        expected_reasons.update(reasons)
    for copy in range(2):
        value, reasons = mixed_batch(copy)
        messages.append(("marketing-spend", value))
        expected_reasons.update(reasons)
    # last: money in another currency than the store's first one
    for copy in range(3):
        wrong = {"event_id": f"wrong-currency-{copy}", "type": "order.placed", "occurred_at": 1_700_300_000_000,
                 "store_id": "store-1", "customer_id": "c", "order_id": "o", "amount": "1", "currency": "JPY"}
        messages.append(("orders", orjson.dumps(wrong)))
        expected_reasons["currency_mismatch"] += 1
    valid: list[Event] = []
    for topic, value in messages:
        for item in parse_message(value, topic, now_ms=FUTURE_MS - DAY_MS, max_future_skew_ms=300_000):
            if isinstance(item, Event) and item.store_id != "*":
                valid.append(item)
    return messages, expected_reasons, valid


def reference_of(valid: list[Event]) -> tuple[dict[tuple[str, int], dict[str, Any]], int, dict[int, str]]:
    """The batch reference of the valid events as of the last accepted one: (numbers, as_of_ms, window names)."""
    accepted = accepted_events(valid)
    as_of_ms = max(event.occurred_at_ms for event in accepted)
    windows_ms = tuple(parse_duration(w) for w in WINDOWS)
    reference = reference_all(accepted, windows_ms=windows_ms, as_of_ms=as_of_ms,
                              config=ReferenceConfig(bucket_ms=60_000, horizon_ms=parse_duration(HORIZON)))
    return reference, as_of_ms, dict(zip(windows_ms, WINDOWS, strict=True))


def cohorts_reference_of(valid: list[Event], as_of_ms: int) -> dict[str, dict[str, Any]]:
    """The batch reference's cohort matrix of every store and ``*`` as of ``as_of_ms``."""
    return reference_cohorts_all(valid, as_of_ms=as_of_ms,
                                 config=ReferenceConfig(bucket_ms=60_000, horizon_ms=parse_duration(HORIZON)))


async def cohort_problems(redis: aioredis.Redis, reference: dict[str, dict[str, Any]], as_of_ms: int) -> list[str]:
    """How the cohort matrices in Redis differ from the reference as of ``as_of_ms`` (empty: equal)."""
    problems = []
    for store, expected in reference.items():
        key = metric_key(store, "cohorts")
        stored = await redis.hgetall(key)
        if stored.get("as_of_ms") != str(as_of_ms):
            problems.append(f"{key}: as_of_ms {stored.get('as_of_ms')} != {as_of_ms}")
            continue
        matrix = orjson.loads(stored["json"])
        assert matrix["schema"] == "loyalty.cohorts.v1" and matrix["store_id"] == store
        problems.extend(f"{key} {p}" for p in cohort_differences(matrix, expected))
    return problems


async def redis_problems(redis: aioredis.Redis, reference: dict[tuple[str, int], dict[str, Any]], as_of_ms: int,
                         window_name: dict[int, str]) -> list[str]:
    """How the metric hashes in Redis differ from the reference as of ``as_of_ms`` (empty: equal)."""
    problems = []
    for (store, window_ms), expected in reference.items():
        key = metric_key(store, window_name[window_ms])
        stored = await redis.hgetall(key)
        if stored.get("as_of_ms") != str(as_of_ms):
            problems.append(f"{key}: as_of_ms {stored.get('as_of_ms')} != {as_of_ms}")
            continue
        actual = {name: parse_redis_field(name, stored.get(name, "")) for name in expected}
        problems.extend(f"{key} {p}" for p in metric_differences(actual, expected))
    return problems


def start_worker(env: dict[str, str], work_dir: Path, number: int) -> tuple[subprocess.Popen[bytes], Path]:
    """A ``loyalty worker`` process with its own web port, its output in ``worker-N.log``."""
    log_path = work_dir / f"worker-{number}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*loyalty_command(), "worker"],
            env={**env, "LOYALTY_WEB_PORT": str(free_port())},
            cwd=work_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=exit_with_parent,
        )
    return process, log_path


async def read_topic(bootstrap: str, topic: str, until: Any, timeout: float) -> list[Any]:
    """Every message of a topic from the start, until ``until(messages)`` holds."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"reader-{uuid.uuid4().hex}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    messages: list[Any] = []
    try:
        async def enough() -> bool:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                messages.extend(records)
            return bool(until(messages))

        await async_wait_for(enough, timeout=timeout, message=lambda: f"{topic}: {len(messages)} messages")
    finally:
        await consumer.stop()
    return messages


async def end_offsets(bootstrap: str, topics: list[str]) -> dict[TopicPartition, int]:
    """The end offset of every partition of ``topics`` (of the worker's ``PARTITIONS``)."""
    return await _offsets(bootstrap, topics, beginning=False)


async def beginning_offsets(bootstrap: str, topics: list[str]) -> dict[TopicPartition, int]:
    """The first offset still in the log of every partition of ``topics``."""
    return await _offsets(bootstrap, topics, beginning=True)


async def _offsets(bootstrap: str, topics: list[str], beginning: bool) -> dict[TopicPartition, int]:
    tps = [TopicPartition(topic, partition) for topic in topics for partition in range(PARTITIONS)]
    return await log_offsets(bootstrap, tps, beginning)


#: (workers, how they start, Redis database, table store): ``stable`` waits for the group to settle
#: before any data; ``join`` starts the second worker once the first is processing, so a rebalance
#: moves live partitions. RocksDB is the product's default store.
#: run -> (workers, start, Redis database, store, LOYALTY_SLICE_EVENTS): two runs cut every batch
#: of the gate and the facts stage into small slices, sent on one after another
RUNS = {
    "1": (1, "stable", 11, "rocksdb", "5000"),
    "1-memory": (1, "stable", 14, "memory", "5000"),
    "2": (2, "stable", 12, "rocksdb", "300"),
    "join": (2, "join", 13, "rocksdb", "300"),
}


def health_counter(values: dict[str, str], name: str) -> int:
    return int(values.get(name) or 0)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("run", list(RUNS))
async def test_pipeline_equals_batch_reference(services, topic_prefix, app_id, tmp_path: Path, run: str) -> None:
    """20,000+ events over 120 days (late, duplicated, invalid) give exactly the reference numbers everywhere.

    Also when a worker joins mid-stream: the rebalance moves partitions (and their table state) while
    events flow, and nothing may be lost or counted twice.
    """
    workers, start, database, store, slice_events = RUNS[run]
    messages, expected_reasons, valid = produce_plan()
    assert len(valid) >= 20_000
    reference, as_of_ms, window_name = reference_of(valid)
    cohorts = cohorts_reference_of(valid, as_of_ms)
    # 120 days of history: five monthly cohorts, each with customers still active and lost since
    assert sum(1 for row in cohorts["*"]["cohorts"] if row["customers"]) >= 4
    assert any(0 < (row["active_customers"][1] or 0) < row["customers"] for row in cohorts["*"]["cohorts"])
    # the NPS segment maps are compared too: the history gives every segment customers who churn
    longest = max(window_name)
    assert all(reference[("*", longest)]["churn_rate_by_nps_segment"][segment]
               for segment in ("promoter", "passive", "detractor", "none"))
    assert any(numbers["net_revenue_by_nps_segment"] and numbers["net_revenue_by_nps_segment"]["detractor"] > 0
               for (store, window_ms), numbers in reference.items() if store != "*" and window_ms == longest)

    bootstrap = services.kafka_bootstrap
    # Redis keys are fixed by the SPEC: each run gets a database of its own
    redis_url = services.redis_url.rsplit("/", 1)[0] + f"/{database}"
    inputs = ["orders", "signups", "survey-responses", "marketing-spend", "loyalty-activity"]
    await ensure_topics(bootstrap, [topic_prefix + name for name in inputs], PARTITIONS)
    env = clean_env(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        REDIS_URL=redis_url,
        LOYALTY_APP_ID=app_id,
        LOYALTY_TOPIC_PREFIX=topic_prefix,
        LOYALTY_STORE=store,
        LOYALTY_PARTITIONS=str(PARTITIONS),
        LOYALTY_CLOCK="event",
        LOYALTY_WINDOWS=",".join(WINDOWS),
        LOYALTY_ACTIVE_HORIZON=HORIZON,
        LOYALTY_EMIT_INTERVAL="200ms",
        LOYALTY_SLICE_EVENTS=slice_events,
        LOYALTY_STATE_DIR=str(tmp_path / "state"),
        LOYALTY_LOG_LEVEL="warning",
        # one run with every event through the gate, as before the path around it
        LOYALTY_GATE_BYPASS="0" if run == "1-memory" else "1",
    )
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    first = workers if start == "stable" else 1
    for number in range(first):
        processes.append(start_worker(env, tmp_path, number))

    def logs() -> str:
        return "\n".join(f"--- {path.name}\n{tail(path, 40)}" for _, path in processes)

    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await redis.flushdb()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2 * 1024 * 1024,
                                linger_ms=5)
    await producer.start()
    last_problems: list[str] = []
    # stable: scale-out, the workers share the partitions before the data comes
    await async_wait_for(lambda: group_is_stable(bootstrap, app_id, first), timeout=120, interval=0.5,
                         message=lambda: f"consumer group {app_id} never had {first} stable members\n{logs()}")
    started = time.monotonic()
    try:
        async def send(batch: list[tuple[str, bytes | None]]) -> None:
            for topic, value in batch:
                # a tombstone needs a key; the key is free otherwise
                await producer.send(topic_prefix + topic, value, key=None if value is not None else b"tombstone")
            await producer.flush()

        if start == "stable":
            await send(messages)
        else:
            # join: the others start once the first worker is applying events, and the rest of the
            # input keeps coming while they join, so the rebalance moves partitions (and their
            # table state) in the middle of the stream
            head = len(messages) // 4
            await send(messages[:head])

            async def processing() -> bool:
                for process, _ in processes:
                    if process.poll() is not None:
                        raise AssertionError(f"a worker exited with {process.returncode}:\n{logs()}")
                return health_counter(await redis.hgetall("loyalty:health"), "events_applied") > 0

            await async_wait_for(processing, timeout=120, interval=0.1,
                                 message=lambda: f"the first worker applies no events\n{logs()}")
            for number in range(first, workers):
                processes.append(start_worker(env, tmp_path, number))
            joined_at: float | None = None
            position, step = head, 40
            while position < len(messages):
                await send(messages[position:position + step])
                position += step
                if joined_at is None and await group_members(bootstrap, app_id) >= workers:
                    joined_at = time.monotonic()
                if joined_at is None or time.monotonic() - joined_at < 5:
                    await asyncio.sleep(0.1)  # a trickle until the rebalance is under way
                else:
                    step = len(messages)

        async def redis_matches() -> bool:
            for process, _ in processes:
                if process.poll() is not None:
                    raise AssertionError(f"a worker exited with {process.returncode}:\n{logs()}")
            problems = await redis_problems(redis, reference, as_of_ms, window_name)
            problems += await cohort_problems(redis, cohorts, as_of_ms)
            last_problems[:] = problems
            return not problems

        await async_wait_for(redis_matches, timeout=300, interval=0.5,
                             message=lambda: "\n".join(last_problems[:30]) + "\n" + logs())
        # the path around the gate was taken (unless switched off), and every store's first money event went
        # through the gate (no decision existed for it); each valid event was read once at least, on one path or
        # the other
        money_stores = {event.store_id for event in valid if event.type in MONEY_TYPES}

        async def paths_counted() -> bool:
            health = await redis.hgetall("loyalty:health")
            around = health_counter(health, "events_around_gate")
            through = health_counter(health, "events_through_gate")
            last_problems[:] = [f"{around} events around the gate, {through} through it, {len(valid)} valid"]
            if run == "1-memory":
                return around == 0 and through >= len(valid)
            return around > 0 and through >= len(money_stores) and around + through >= len(valid)

        await async_wait_for(paths_counted, timeout=30, interval=0.5, message=lambda: "\n".join(last_problems))
        repartitioned = await end_offsets(bootstrap, [f"{topic_prefix}{app_id}-{name}"
                                                      for name in ("events-by-store", "events-by-customer")])
        print(f"{len(valid)} valid events, {len(messages)} messages, {workers} worker(s): "
              f"Redis equal to the reference {time.monotonic() - started:.1f}s after the first send")

        # the last snapshot per key on the output topic says the same
        def output_complete(records: list[Any]) -> bool:
            latest = {record.key.decode(): orjson.loads(record.value) for record in records}
            problems = []
            for (store, window_ms), expected in reference.items():
                snapshot = latest.get(f"{store}|{window_name[window_ms]}")
                if snapshot is None or snapshot["as_of_ms"] != as_of_ms:
                    problems.append(f"{store}|{window_ms}: no snapshot as of {as_of_ms}")
                    continue
                assert snapshot["schema"] == "loyalty.metrics.v1"
                problems.extend(f"{store}|{window_ms} {p}" for p in metric_differences(snapshot["metrics"], expected))
            for store, expected_matrix in cohorts.items():
                matrix = latest.get(f"{store}|cohorts")
                if matrix is None or matrix["as_of_ms"] != as_of_ms:
                    problems.append(f"{store}|cohorts: no matrix as of {as_of_ms}")
                    continue
                problems.extend(f"{store}|cohorts {p}" for p in cohort_differences(matrix, expected_matrix))
            last_problems[:] = problems
            return not problems

        await read_topic(bootstrap, topic_prefix + "loyalty-metrics", output_complete, timeout=60)

        # the dead letters are exactly the invalid inputs, with their reasons
        total = sum(expected_reasons.values())
        letters = await read_topic(bootstrap, topic_prefix + "loyalty-dead-letters",
                                   lambda found: len(found) >= total, timeout=60)
        reasons = Counter(orjson.loads(letter.value)["reason"] for letter in letters)
        assert reasons == expected_reasons
        for letter in letters:
            body = orjson.loads(letter.value)
            assert body["topic"].startswith(topic_prefix) and body["offset"] >= 0

        # every event is processed: the stages delete their repartition topics below it (within a
        # purge interval); the watermark marks keep every partition committing, so this does not
        # single out a partition that went quiet after its last commit
        async def purged() -> bool:
            beginnings = await beginning_offsets(bootstrap, list({tp.topic for tp in repartitioned}))
            short = {tp: (beginnings[tp], end) for tp, end in repartitioned.items() if beginnings[tp] < end}
            last_problems[:] = [f"{tp.topic}[{tp.partition}] begins at {b}, processed up to {e}"
                                for tp, (b, e) in short.items()]
            return not short

        await async_wait_for(purged, timeout=90, interval=1, message=lambda: "\n".join(last_problems) + "\n" + logs())
    finally:
        await producer.stop()
        await redis.aclose()
        for process, _ in processes:
            stop_process(process, timeout=60)
